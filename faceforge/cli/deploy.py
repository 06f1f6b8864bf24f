"""The inference commands of ``faceforge``: ``embed``, ``verify``, ``search`` (and ``search build``), ``export``.

Each is a thin call into :mod:`faceforge.deploy.inference` / :mod:`faceforge.deploy.export`. Their errors are
ValueError / OSError / ImportError subclasses that name the file or option, which ``faceforge.cli.main``
prints as one line, ``faceforge <cmd>: <file/key>: <what is wrong, what was expected>``, exit status 2
(``--debug`` for the traceback); the model and the input paths are checked before any image is embedded.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from faceforge.core.errors import UsageError

__all__ = ["add_commands"]


# --------------------------------------------------------------------------------------------------
# Shared options
# --------------------------------------------------------------------------------------------------


TRUST_CODE_HELP = ("let the model file's metadata or the checkpoint's config name a backbone to import "
                   "('package.module:Class'): that runs its code. Only for files whose author you trust "
                   "(default: off, registered backbones only; see docs/inference.md)")


def add_trust_code(p: argparse.ArgumentParser) -> None:
    """``--trust-code`` on a command that loads a model file (embed, verify, search, export, eval)."""
    p.add_argument("--trust-code", action="store_true", help=TRUST_CODE_HELP)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run folder, last.pt, model.safetensors or an .onnx file")
    add_trust_code(p)
    g = p.add_argument_group("a foreign ONNX model (no faceforge metadata) needs its normalisation")
    g.add_argument("--mean", type=float, nargs="+", default=None, metavar="M",
                   help="per-channel mean in 0..255 (1 or 3 numbers; default: from the model, 127.5 for faceforge models)")
    g.add_argument("--std", type=float, nargs="+", default=None, metavar="S",
                   help="per-channel std in 0..255 (1 or 3 numbers; default: from the model, 127.5 for faceforge models)")
    g.add_argument("--channel-order", choices=("RGB", "BGR"), default=None, help="channel order the model expects (default: from the model, else RGB)")
    g.add_argument("--image-size", type=int, default=None, help="aligned crop side (default: from the model)")
    g.add_argument("--flip-test", choices=("on", "off"), default=None,
                   help="sum the embedding of the mirrored face (default: from the model; off for foreign models)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch / onnxruntime / faiss (default: the libraries' own)")
    p.add_argument("--device", default=None, help="torch device for torch models (default cpu)")


def _image_options(p: argparse.ArgumentParser, skip: bool = True) -> None:
    p.add_argument("--detect", action="store_true",
                   help="detect and align raw photos with YuNet (pip install 'faceforge[detect]'); without it (default), "
                        "images must be aligned crops of the model's image size")
    if skip:
        p.add_argument("--skip-bad", action="store_true",
                       help="skip images that cannot be decoded or (with --detect) show no face, and count them (default: stop at the first)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")


def _foreign(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("mean", "std"):
        v = getattr(args, key)
        if v is not None:
            if len(v) not in (1, 3):
                raise UsageError(f"--{key}: got {len(v)} numbers, expected 1 or 3 (per channel, 0..255 scale)")
            out[key] = v * 3 if len(v) == 1 else v
    if args.channel_order:
        out["channel_order"] = args.channel_order
    if args.image_size is not None:
        out["image_size"] = args.image_size
    if args.flip_test is not None:
        out["flip_test"] = args.flip_test == "on"
    return out


def _threads(n: int | None) -> None:
    if n is None:
        return
    if n < 1:
        raise UsageError(f"--threads: got {n}, expected an int >= 1")
    import torch

    torch.set_num_threads(n)


def _load(args: argparse.Namespace) -> Any:
    from faceforge.deploy.inference import load_model

    if getattr(args, "batch_size", 1) < 1:
        raise UsageError(f"--batch-size: got {args.batch_size}, expected an int >= 1")
    _threads(args.threads)
    return load_model(args.model, device=args.device, threads=args.threads, trust_code=args.trust_code,
                      **_foreign(args))


def _image_paths(inputs: Sequence[str]) -> list[str]:
    """Files given, and the images anywhere under folders given (sorted); a missing path is an error."""
    from faceforge.data.folder import IMAGE_EXTENSIONS

    paths: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                           and not f.name.startswith("."))
            if not found:
                raise UsageError(f"{item}: no images in this folder (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif p.is_file():
            paths.append(item)
        else:
            raise UsageError(f"{item}: not found (expected an image file or a folder of images)")
    return paths


def _report_skipped(skipped: list[str]) -> None:
    if skipped:
        print(f"skipped {len(skipped)} image(s):", file=sys.stderr)
        for s in skipped:
            print(f"  {s}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


def _embed(args: argparse.Namespace) -> int:
    from faceforge.core.fileio import atomic_open, save_npy

    paths = _image_paths(args.images)
    out = Path(args.out)
    if out.suffix != ".npy":
        raise UsageError(f"--out {args.out}: expected a .npy path (the file list goes beside it as .txt)")
    r = _load(args)
    emb, quality, kept, skipped = r.embed_files_with_quality(paths, detect=args.detect, skip_bad=args.skip_bad,
                                                             batch_size=args.batch_size, progress=not args.quiet)
    save_npy(out, emb)
    files, table = out.with_suffix(".txt"), out.with_suffix(".csv")
    with atomic_open(files, "w") as f:
        f.write("".join(f"{k}\n" for k in kept))
    with atomic_open(table, "w") as f:  # one row per embedding row: the file and its quality
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("file", "quality"))
        writer.writerows((k, repr(float(q))) for k, q in zip(kept, quality))
    _report_skipped(skipped)
    print(f"embeddings: {out} ({emb.shape[0]} x {emb.shape[1]}, float32, L2-normalised)")
    print(f"files:      {files}")
    note = r.quality_note()
    print(f"quality:    {table} (file, quality = the embedding norm before normalisation"
          f"{'; not a calibrated quality for this model' if note else ''})")
    if skipped:
        print(f"skipped:    {len(skipped)}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    for p in (args.a, args.b):
        if not Path(p).is_file():
            raise UsageError(f"{p}: image not found")
    if args.threshold is not None and not -1.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold: got {args.threshold}, expected a cosine in [-1, 1]")
    r = _load(args)
    v = r.verify(args.a, args.b, threshold=args.threshold, detect=args.detect)
    print(f"cosine {v.cosine:.4f}")
    if v.threshold is None:
        print("no threshold: the model carries none; give --threshold")
        return 0
    far = f", FAR {v.threshold_far:.2g}" if v.threshold_far is not None else ""
    where = f" ({v.threshold_source}{far})" if v.threshold_source else ""
    print(f"{'same person' if v.same else 'different people'} at threshold {v.threshold:.4f}{where}")
    return 0


def _search_build(argv: list[str]) -> int:
    from faceforge.deploy.inference import INDEX_KINDS, Gallery, embed_gallery, gallery_entries

    p = argparse.ArgumentParser(prog="faceforge search build",
                                description="embed an identity folder (one sub-folder per identity) into a faiss index")
    _model_options(p)
    p.add_argument("gallery", help="folder with one sub-folder of images per identity")
    p.add_argument("index", help="output folder: index.faiss, embeddings.npy, gallery.json")
    p.add_argument("--kind", choices=INDEX_KINDS, default=None,
                   help="flat: exact inner product (default); ivf / hnsw: approximate, for large galleries "
                        "(--append keeps the index's own kind)")
    p.add_argument("--append", action="store_true",
                   help="add to an existing index folder, built by the same model (default: replace it)")
    p.add_argument("--skip-existing", action="store_true",
                   help="--append: skip images already in the index (default: refuse them)")
    p.add_argument("--force", action="store_true",
                   help="--append: add to an index built by another model (its fingerprint differs; default: refuse)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: shown)")
    _image_options(p)
    args = p.parse_args(argv)
    if not Path(args.gallery).is_dir():
        raise UsageError(f"{args.gallery}: not a folder (expected one sub-folder of images per identity)")
    if args.append and not (Path(args.index) / "gallery.json").is_file():
        raise UsageError(f"{args.index}: --append: no gallery.json here (expected a folder written by search build)")
    for flag in ("skip_existing", "force"):
        if getattr(args, flag) and not args.append:
            raise UsageError(f"--{flag.replace('_', '-')}: only with --append")
    paths, identities = gallery_entries(args.gallery)
    r = _load(args)
    _faiss_threads(args.threads)
    old = None
    if args.append:  # model, dimension and duplicates checked before anything is embedded
        old = Gallery.load(args.index)
        if args.kind and args.kind != old.kind:
            raise UsageError(f"--kind {args.kind}: {args.index} is a {old.kind} index and --append keeps its kind; "
                             "expected no --kind (or rebuild the index with search build)")
        r.check_gallery(old, force=args.force)
        paths, identities = _new_entries(old, paths, identities, args.index, args.skip_existing)
    new, skipped = embed_gallery(r, paths, identities, kind="flat" if old else args.kind or "flat", detect=args.detect,
                                 skip_bad=args.skip_bad, batch_size=args.batch_size, progress=not args.quiet)
    if old is not None:
        old.add(new.embeddings, new.identities, new.files)
    g = old or new
    g.save(args.index)
    _report_skipped(skipped)
    print(f"index: {args.index} ({len(g)} images of {len(set(g.identities))} identities, {g.kind}, "
          f"{g.dim}-D){f'; skipped {len(skipped)}' if skipped else ''}")
    return 0


def _new_entries(g: Any, paths: list[str], identities: list[str], index: str,
                 skip_existing: bool) -> tuple[list[str], list[str]]:
    """The images not yet in gallery ``g`` (compared as real paths); those already there are an error
    naming the first, unless ``skip_existing``."""
    have = {os.path.realpath(f) for f in g.files}
    fresh = [k for k, p in enumerate(paths) if os.path.realpath(p) not in have]
    if len(fresh) < len(paths) and not skip_existing:
        first = next(p for p in paths if os.path.realpath(p) in have)
        raise UsageError(f"{index}: --append: {len(paths) - len(fresh)} of these images are already in the index "
                         f"(first: {first}); expected new images, or --skip-existing to skip them")
    return [paths[k] for k in fresh], [identities[k] for k in fresh]


def _faiss_threads(n: int | None) -> None:
    if n is not None:
        import faiss

        faiss.omp_set_num_threads(n)


def _search_query(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="faceforge search",
                                description="identities of probe faces from an index built by `faceforge search build`")
    _model_options(p)
    p.add_argument("index", help="an index folder written by `faceforge search build`")
    p.add_argument("probes", nargs="+", help="probe images")
    p.add_argument("--top", type=int, default=5, help="matches per probe (default 5)")
    p.add_argument("--force", action="store_true",
                   help="search an index built by another model (its fingerprint differs; default: refuse)")
    _image_options(p, skip=False)
    args = p.parse_args(argv)
    from faceforge.deploy.inference import Gallery

    if args.top < 1:
        raise UsageError(f"--top: got {args.top}, expected an int >= 1")
    probes = _image_paths(args.probes)
    g = Gallery.load(args.index)
    r = _load(args)
    _faiss_threads(args.threads)
    results = r.search(g, probes, top=args.top, detect=args.detect, force=args.force)
    for probe, matches in zip(probes, results):
        print(probe)
        for rank, m in enumerate(matches, 1):
            print(f"  {rank}. {m.identity:<24} {m.score:.4f}  {m.file}")
    return 0


def _search(args: argparse.Namespace) -> int:
    rest = list(args.rest)
    if args.help and not rest:
        print(_SEARCH_USAGE)
        return 0
    if args.help:
        rest.append("--help")
    if rest and rest[0] == "build":
        return _search_build(rest[1:])
    return _search_query(rest)


def _export(args: argparse.Namespace) -> int:
    from faceforge.deploy.export import DEFAULT_OPSET, export_onnx

    if not Path(args.source).exists():
        raise UsageError(f"{args.source}: not found (expected a run folder, last.pt, model.safetensors or a faceforge .onnx)")
    if not args.output.endswith(".onnx"):
        raise UsageError(f"{args.output}: expected an output path ending in .onnx")
    if args.quantize == "static" and not args.calibration:
        raise UsageError("--quantize static: --calibration: missing, expected a folder of aligned face crops")
    for key in ("calibration", "eval_folder"):
        v = getattr(args, key)
        if v and not Path(v).is_dir():
            raise UsageError(f"--{key.replace('_', '-')} {v}: not a folder")
    _threads(args.threads)
    report = export_onnx(args.source, args.output, opset=args.opset or DEFAULT_OPSET, fuse=not args.no_fuse, quantize=args.quantize,
                         calibration=args.calibration, eval_folder=args.eval_folder, trust_code=args.trust_code)
    print("\n".join(report.lines()))
    return 0


_SEARCH_USAGE = """usage:
  faceforge search build MODEL GALLERY_FOLDER INDEX_FOLDER [--kind flat|ivf|hnsw] [--append [--skip-existing]]
                        [--detect] [--skip-bad] [--trust-code]
  faceforge search MODEL INDEX_FOLDER PROBE... [--top 5] [--detect] [--force] [--trust-code]
(faceforge search build --help and faceforge search MODEL --help list every option)"""


def add_commands(sub: Any, commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Register ``embed``, ``verify``, ``search`` and ``export`` on ``faceforge``'s sub-parsers."""
    p = sub.add_parser("embed", help="embed faces: faceforge embed MODEL IMAGES_OR_FOLDER... --out feats.npy")
    _model_options(p)
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="embeddings .npy (float32 N x D); the file list goes to the .txt beside it and a .csv of "
                        "file,quality (the embedding norm before normalisation; a calibrated quality for MagFace / "
                        "AdaFace models only) too (required, no default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: shown)")
    _image_options(p)
    commands["embed"] = _embed

    p = sub.add_parser("verify", help="are two faces the same person? faceforge verify MODEL a.jpg b.jpg")
    _model_options(p)
    p.add_argument("a", help="first image")
    p.add_argument("b", help="second image")
    p.add_argument("--threshold", type=float, default=None, help="cosine threshold (default: the model's own)")
    _image_options(p, skip=False)
    commands["verify"] = _verify

    p = sub.add_parser(
        "search", help="face search: 'search build MODEL GALLERY INDEX' or 'search MODEL INDEX PROBE... [--top 5]'",
        description=_SEARCH_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    p.add_argument("-h", "--help", action="store_true", help="show the usage of both forms (default: off)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the arguments of either form")
    commands["search"] = _search

    p = sub.add_parser("export", help="export to ONNX (BN folded, parity checked): faceforge export RUN model.onnx")
    p.add_argument("source", help="a run folder, last.pt, model.safetensors, or a faceforge .onnx (copied; to quantise it)")
    p.add_argument("output", help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17, the one tested)")
    p.add_argument("--no-fuse", action="store_true", help="keep the BatchNorms (default: folded into the convs)")
    p.add_argument("--quantize", choices=("dynamic", "static"), default=None,
                   help="also write an int8 model beside it (<name>.int8.onnx), compared with float in the log (default: none)")
    p.add_argument("--calibration", default=None, help="--quantize static: folder of aligned face crops (default: none; required for static)")
    p.add_argument("--eval-folder", default=None,
                   help="identity folder of aligned crops for the int8 vs float comparison (default: 12 real faces)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    add_trust_code(p)
    commands["export"] = _export
