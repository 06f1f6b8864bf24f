"""The `faceforge` command: one subcommand per job, each a thin call into the library.

Nothing here runs at import; `main()` parses the command line and dispatches. A user-facing error (a bad
config, file or option) prints one line, ``faceforge <cmd>: <file/key>: <what is wrong, what was expected>``,
and exits 2; ``--debug`` shows the traceback instead. Ctrl-C exits 130 (``faceforge train`` first writes a
checkpoint at the current step).
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from typing import Callable, Sequence

from faceforge.core.errors import UsageError

# An override on the command line: key=value or dotted.key=value (accepted after --resume too).
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")


def _train(args: argparse.Namespace) -> int:
    from faceforge.train.config import load_config
    from faceforge.train.engine import train

    from faceforge.eval.report import metrics_table

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    if result.metrics:
        print(f"evaluation at step {result.step}:")
        print(metrics_table(result.metrics))
    print(f"checkpoint: {result.checkpoint}")
    print(f"log:        {result.log}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from faceforge.cli.demo import run_demo

    run_demo(config=args.config, overrides=args.overrides, tiny=args.tiny)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from faceforge.eval.evaluate import EvalRequest, evaluate_checkpoints

    checkpoints = ([args.checkpoint] if args.checkpoint else []) + list(args.compare or [])
    if not checkpoints:
        raise UsageError("CHECKPOINT: missing; expected a checkpoint or --compare CKPT_A CKPT_B ...")
    for option, value in (("--pairs", args.num_pairs), ("--batch-size", args.batch_size)):
        if value is not None and value < (0 if option == "--pairs" else 1):
            raise UsageError(f"{option} {value}: expected an int >= {0 if option == '--pairs' else 1}")
    given = {f.name: getattr(args, f.name, None) for f in fields(EvalRequest)}  # options are named as the fields
    request = EvalRequest(**{name: value for name, value in given.items() if value is not None})
    from faceforge.core.registry import trusting_code

    with trusting_code(args.trust_code):  # --trust-code: the checkpoints' configs may name imports
        evaluate_checkpoints(checkpoints, output=args.output, request=request)
    return 0


def _backbones(args: argparse.Namespace) -> int:
    from faceforge.backbones.complexity import main as complexity_main

    return complexity_main([]) or 0


def _render(args: argparse.Namespace) -> int:
    from faceforge.data.synthetic import montage

    montage(
        args.output,
        num_identities=args.identities,
        images_per_identity=args.images,
        difficulty=args.difficulty,
        image_size=args.size,
        seed=args.seed,
    )
    print(f"montage: {args.output}")
    return 0


def _align(args: argparse.Namespace) -> int:
    from faceforge.data.align import align_files

    landmarks = args.landmarks
    if args.detect:  # `landmarks` names photos: detect them first (optional extra: faceforge[detect])
        from pathlib import Path

        from faceforge.data.detect import YuNetDetector, landmarks_for_files, write_landmarks

        photos = sorted(p for p in Path(landmarks).iterdir() if p.is_file()) if Path(landmarks).is_dir() else [landmarks]
        landmarks = write_landmarks(landmarks_for_files(photos, YuNetDetector()), Path(args.output) / "landmarks.txt")
        print(f"landmarks of {len(photos)} photos: {landmarks}")
    written = align_files(landmarks, args.output, size=args.size)
    print(f"aligned {len(written)} images into {args.output}")
    return 0


def _data_error(command: str, e: Exception) -> int:
    print(f"faceforge {command}: {_one_line(e)}", file=sys.stderr)
    return 2


def _one_line(e: BaseException) -> str:
    """The exception's message on one line (a KeyError's repr quotes stripped)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split()) or type(e).__name__


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are the user's to fix: a config, a file, a value, a checkpoint, a diverged run, a
    pickle (a ``.bin`` pair set) that is corrupt or asks for more than data (``UnsafePickleError``)."""
    import pickle

    from faceforge.core.checkpoint import CheckpointError

    return (ValueError, OSError, LookupError, ImportError, CheckpointError, FloatingPointError, pickle.UnpicklingError)


def _pack(args: argparse.Namespace) -> int:
    import os

    from faceforge.data.pack import PackError, pack_folder, pack_list

    try:
        if os.path.isdir(args.src):
            result = pack_folder(args.src, args.dest, workers=args.workers, skip_bad=args.skip_bad)
        else:
            result = pack_list(args.src, args.dest, root=args.root, workers=args.workers, skip_bad=args.skip_bad)
    except (PackError, ValueError, OSError) as e:
        return _data_error("pack", e)
    print(result.summary())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from faceforge.data.pack import inspect_path

    try:
        report = inspect_path(args.path, decode=args.decode, sample=args.sample)
    except (ValueError, OSError) as e:
        return _data_error("inspect", e)
    print(report)
    return 1 if report.unreadable else 0


def _pack_pairs(args: argparse.Namespace) -> int:
    from faceforge.data.pack import pack_pairs

    try:
        n = pack_pairs(args.pairs, args.dest, root=args.root, size=args.size, workers=args.workers)
    except (ValueError, OSError) as e:
        return _data_error("pack-pairs", e)
    print(f"wrote {n} pairs to {args.dest}")
    return 0


def _clean(args: argparse.Namespace) -> int:
    from faceforge.eval.clean import clean_run

    print(clean_run(args.run, data=args.data, out=args.out, angle=args.angle, trust_code=args.trust_code).summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faceforge",
        epilog="Errors print one line and exit 2; add --debug (anywhere) for the traceback.",
        description="Train and evaluate face-recognition models (ArcFace, SphereFace2, BroadFace, AttFC, BigFace).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, Callable[[argparse.Namespace], int]] = {}

    p = sub.add_parser("train", help="train from a YAML config: faceforge train CONFIG [key=value ...] [--resume]",
                       description="Train into the config's output folder. A folder that already holds a run is "
                                   "refused unless --resume is given (or a new output= is set).")
    p.add_argument("config", help="path to a YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 train.epochs=3 (also after --resume)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt (default: off, start a new run)")
    commands["train"] = _train

    p = sub.add_parser("demo", help="train a small IResNet with ArcFace on synthetic faces and compare with the untrained net")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the demo config")
    p.add_argument("--config", default=None, help="demo config (default: the packaged configs/demo.yaml)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long version, for tests (default: off)")
    commands["demo"] = _demo

    p = sub.add_parser(
        "eval", help="evaluate checkpoints: .bin sets, IJB-B/C, identification with distractors, retrieval",
        description="Without a set option, each checkpoint's own held-out sets (files inside its run folder only). "
                    "Set options combine; every run writes results.md/.json, roc.png, hist_<set>.png and caches the "
                    "features as .npy (read back only if this installation wrote them).")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="a model: a `faceforge train` run folder or checkpoint (last.pt), model.safetensors or .onnx")
    p.add_argument("--compare", nargs="+", default=None, metavar="CKPT",
                   help="several checkpoints side by side: one table (checkpoint x set) and one ROC plot (default: none)")
    p.add_argument("--output", default=None,
                   help="folder for results.md/.json, roc.png, hist_<set>.png and the cached features "
                        "(default: eval/<step>/<sets>/ beside the (first) checkpoint: one folder per sets)")
    p.add_argument("--bin", dest="bins", action="append", default=[], metavar="BIN",
                   help="an insightface .bin pair set (lfw.bin, cfp_fp.bin, ...): 10-fold accuracy; repeatable "
                        "(default: none)")
    p.add_argument("--pairs", dest="num_pairs", type=int, default=None,
                   help="held-out pairs when the checkpoint's own sets are used (default: the run's data.eval_pairs)")
    p.add_argument("--ijb", default=None, metavar="ROOT",
                   help="an IJB-B/C release (meta/, loose_crop/): 1:1 TAR@FAR 1e-6..1e-1, and 1:N TPIR@FPIR "
                        "and rank-1/5/10 per gallery when meta/<name>_1N_*.csv are there (default: none)")
    p.add_argument("--ijb-name", default="IJBC", choices=("IJBB", "IJBC"), help="which release (default IJBC)")
    p.add_argument("--ijb-faceness", action="store_true", default=None,
                   help="weight image features by faceness score (default: off; on under --protocol insightface)")
    p.add_argument("--protocol", dest="ijb_protocol", default="faceforge", choices=("faceforge", "insightface"),
                   help="how IJB numbers are read: faceforge = TAR the largest with FPR <= FAR, floor(FPIR N) "
                        "false alarms; insightface = its reference code's choices (the ROC point nearest the "
                        "FAR, one false alarm fewer, faceness weighting); the report names it (default: faceforge)")
    p.add_argument("--probes", default=None, metavar="PATH",
                   help="identification probes: a folder of identity sub-folders or a .rec (first image of "
                        "each identity enrolled, the others searched); needs --distractors (default: none)")
    p.add_argument("--distractors", default=None, metavar="PATH",
                   help="a folder (images anywhere under it) or a .rec of distractors: rank-k with 10 .. all "
                        "of them, TAR@FAR=1e-6 (MegaFace style) (default: none)")
    p.add_argument("--distractor-counts", type=int, nargs="+", default=None, metavar="N",
                   help="distractor counts of the rank-1 curve (default 10 100 ... 1000000; all are added)")
    p.add_argument("--retrieval", default=None, metavar="PATH",
                   help="a labelled image set (folder or .rec): Recall@1/10/20/30/100/1000 and mAP (default: none)")
    p.add_argument("--retrieval-test-fraction", type=float, default=None, metavar="F",
                   help="evaluate only a class-disjoint split with this fraction of the classes (default: all classes)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--encoder", default="query", choices=("query", "momentum"),
                   help="embed with the trained backbone (query, default) or AttFC's momentum class encoder")
    p.add_argument("--masked", action="store_true",
                   help="also score every 1:1 pair set with the second image of each pair wearing a synthetic "
                        "mask (MFR style), unmasked and masked side by side (default: off)")
    p.add_argument("--degraded", action="store_true",
                   help="also score every 1:1 pair set with the second image of each pair degraded: 1/4 resolution "
                        "and back (area down, bilinear up), then a Gaussian blur of sigma 1.5 px at 112 px (scaled "
                        "with the image); clean and degraded side by side (default: off)")
    p.add_argument("--no-flip", dest="flip", action="store_false", default=None,
                   help="embed f(x) only, without the test-time flip (default: f(x) + f(flip(x)))")
    p.add_argument("--quality", nargs="?", const="norm", default=None, metavar="SCORES.npy",
                   help="error versus reject on every 1:1 pair set: FNMR at FMR 1e-3 and 1e-2 (threshold fixed on "
                        "all pairs) after rejecting the lowest-quality 0/10/20/30 %% of genuine pairs, its area and "
                        "random rejection, plotted in error_vs_reject.png; the quality is the model's embedding norm "
                        "('norm', the default), or a .npy of one score per image (2N) or per pair (N) of one pair "
                        "set (default: off)")
    from faceforge.cli.deploy import add_trust_code  # the one --trust-code of every command that loads models

    add_trust_code(p)
    commands["eval"] = _eval

    p = sub.add_parser("backbones", help="list the registered backbones with parameters and FLOPs")
    commands["backbones"] = _backbones

    p = sub.add_parser("render", help="write a montage PNG of synthetic identities")
    p.add_argument("output", help="PNG path")
    p.add_argument("--identities", type=int, default=8, help="rows: synthetic identities (default 8)")
    p.add_argument("--images", type=int, default=8, help="columns: images per identity (default 8)")
    p.add_argument("--difficulty", type=float, default=1.0,
                   help="pose, lighting and occlusion spread; 0 = frontal and clean (default 1.0)")
    p.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the identities (default 0)")
    commands["render"] = _render

    p = sub.add_parser("align", help="align photos to the ArcFace template from 5-point landmarks")
    p.add_argument("landmarks", help="text file: image_path x1 y1 ... x5 y5 per line (eyes, nose tip, mouth corners)")
    p.add_argument("output", help="folder for the aligned PNG crops")
    p.add_argument("--size", type=int, default=112, help="crop side in pixels (default 112)")
    p.add_argument("--detect", action="store_true",
                   help="LANDMARKS is a photo or a folder of photos: find the 5 points with YuNet "
                        "(pip install 'faceforge[detect]'; nothing is downloaded) (default: off)")
    commands["align"] = _align

    p = sub.add_parser("pack", help="pack an image folder or a 'path label' list into a .rec/.idx")
    p.add_argument("src", help="folder with one sub-folder of images per identity, or a list file of 'path label' lines")
    p.add_argument("dest", help="output prefix: writes DEST.rec, DEST.idx (and DEST.labels.json for a folder)")
    p.add_argument("--workers", type=int, default=None, help="image-reading threads (default: number of CPUs)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images, listing them in DEST.bad.txt (default: off, stop at the first)")
    p.add_argument("--root", default=None, help="folder for relative paths of a list file (default: the list's folder)")
    commands["pack"] = _pack

    p = sub.add_parser("inspect", help="summarise a .rec prefix, an image folder or a .bin; exit 1 if any image is unreadable")
    p.add_argument("path", help="a .rec/.idx prefix or file, a folder of identity sub-folders, or a .bin pair set")
    p.add_argument("--decode", action="store_true", help="decode every image and list each failure (default: off)")
    p.add_argument("--sample", type=int, default=64, help="without --decode: image headers to read for sizes (default 64)")
    commands["inspect"] = _inspect

    p = sub.add_parser("pack-pairs", help="write a .bin pair set from a 'path1 path2 0|1' pair list")
    p.add_argument("pairs", help="pair list: 'path1 path2 0|1' per line")
    p.add_argument("dest", help="output .bin path")
    p.add_argument("--root", default=None, help="folder for relative paths in the list (default: the current folder)")
    p.add_argument("--size", type=int, default=None, help="resize every image to SIZE x SIZE (default: all must share one size)")
    p.add_argument("--workers", type=int, default=None, help="image-reading threads (default: number of CPUs)")
    commands["pack-pairs"] = _pack_pairs

    p = sub.add_parser("clean", help="drop the noisy samples of a Sub-center ArcFace run's training set: write a "
                                     "cleaned .rec/.idx and a report")
    p.add_argument("run", help="a run folder (its last.pt) or checkpoint trained with head.name: subcenter_arcface")
    p.add_argument("--data", default=None, help="the training images to clean, a .rec prefix or an image folder "
                   "(default: the run's own data when it has no path, e.g. the synthetic set with its label noise)")
    p.add_argument("--out", default=None,
                   help="output prefix: writes OUT.rec, OUT.idx, OUT.json (default: RUN/cleaned)")
    p.add_argument("--angle", type=float, default=75.0,
                   help="drop samples farther than this many degrees from their class's dominant sub-centre "
                        "(default 75, the paper's)")
    add_trust_code(p)
    commands["clean"] = _clean

    from faceforge.cli.deploy import add_commands  # embed, verify, search, export

    add_commands(sub, commands)
    from faceforge.deploy.import_weights import add_command  # import-weights

    add_command(sub, commands)

    for sub_parser in sub.choices.values():
        sub_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                help="on an error, show the traceback instead of one line (default: off)")
    parser.set_defaults(_commands=commands)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; ``key=value`` overrides may also follow an option (``train CONFIG --resume optim.lr=0.01``)."""
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if _OVERRIDE.match(a)]
    if overrides and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *overrides]
    rest = [a for a in extra if a not in overrides or not hasattr(args, "overrides")]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback (default: off)")
    args = _parse(parser, argv)
    code = _run_command(args, parser)
    from faceforge.train.distributed import end_process_after_group  # torch: not imported for `faceforge --help`

    return end_process_after_group(code)  # under torchrun, the process ends here (faceforge.train.distributed)


def _run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    command = f"faceforge {args.command}"
    try:
        return args._commands[args.command](args)
    except KeyboardInterrupt as e:
        print(f"{command}: {_one_line(e) if str(e) else 'interrupted'}", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if args.debug:
            traceback.print_exc()
        print(f"{command}: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not the user's input: still one line, the traceback with --debug
        if args.debug:
            raise
        print(f"{command}: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the "
              f"traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
