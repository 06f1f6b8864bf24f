"""Hostile model files, checkpoints and run folders (issue 26): what each costs before and after, a fresh process per input.

The model-file half of ``bench_hostile_data.py`` (whose ``run`` measures each case: ``ulimit -v``, exit code,
wall time, peak RSS from ``/usr/bin/time``, the last stderr line). Every input is made here in a temporary
folder (nothing shipped), once per tree, and every case is a ``faceforge`` command run with that tree first
on ``PYTHONPATH``; after it, a check reads what the command left behind (a marker file written by planted code,
a planted link's target overwritten, the accuracy a report claims).

    PYTHONPATH=. python benchmarks/bench_hostile_models.py --before /path/to/old/tree [--limit-gb 4]

Items of issue 26: 1 (code named by a model file or a checkpoint), 2 (a checkpoint naming files outside its
folder), 3 (a planted link at eval's results.md), 4 (a crafted feature cache), 6 (std 1e-320), 11 (sizes),
14 (gallery.json), and issue 25's truncated index.faiss. The others are bench_hostile_data.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hostile_data import _png, run  # noqa: E402  (the measuring helper, shared)

SIZE, DIM, CLASSES = 32, 16, 8  # the base model: r18 at quarter width, 32x32 crops, 16-D
CONFIG = {"seed": 0, "model": {"backbone": "r18", "embedding_size": DIM, "kwargs": {"width": 0.25}},
          "head": {"name": "arcface"},
          "data": {"name": "synthetic", "num_identities": CLASSES, "images_per_identity": 4, "image_size": SIZE,
                   "batch_size": 16, "eval_pairs": 40, "eval_identities": 20},
          "train": {"steps": 1, "progress": False}}
STEP = 7


@dataclass
class Case:
    """One hostile input: ``argv`` of ``faceforge``; ``prepare(tree)`` runs first (unmeasured); ``check()`` says
    what the command left behind (a marker, a link's target, a claimed accuracy)."""

    item: str
    what: str
    argv: list[str]
    check: Callable[[], str] = lambda: ""
    prepare: Callable[[str], None] | None = None
    notes: list[str] = field(default_factory=list)


def _faceforge(tree: str, argv: list[str]) -> str:
    """The shell command: ``faceforge argv`` with ``tree`` first on the path (the old tree's cli is a module,
    the new one's a package: ``-m faceforge.cli`` runs both), run from ``/`` (``-m`` puts the current folder
    before PYTHONPATH: run from a worktree, it would shadow ``tree``). numpy's RuntimeWarnings are silenced so
    that the last line is the command's own (the old code's ``std: 1e-320`` printed one on stderr)."""
    import shlex

    return (f"env -C / PYTHONPATH={shlex.quote(os.path.abspath(tree))} {shlex.quote(sys.executable)} "
            "-W ignore::RuntimeWarning -m faceforge.cli "
            + shlex.join(argv))


def _backbone() -> torch.nn.Module:
    from faceforge.backbones import build

    torch.manual_seed(0)
    return build("r18", embedding_size=DIM, input_size=SIZE, width=0.25).eval()


def _model_files(folder: Path, **meta: object) -> Path:
    """``folder/model.safetensors`` + ``model.json`` of :func:`_backbone`, ``meta`` overriding model.json."""
    from safetensors.torch import save_file

    from faceforge.deploy.modelfile import META_KEY, MODEL_JSON, MODEL_WEIGHTS, ModelInfo

    folder.mkdir(parents=True, exist_ok=True)
    info = json.loads(ModelInfo(backbone="r18", embedding_size=DIM, image_size=SIZE, backbone_kwargs={"width": 0.25},
                                threshold=0.3, name="m").to_json())
    text = json.dumps({**info, **meta})  # NaN / Infinity / 1e-320 pass through json as they would from a file
    save_file({k: v.contiguous() for k, v in _backbone().state_dict().items()}, str(folder / MODEL_WEIGHTS),
              metadata={META_KEY: text})
    (folder / MODEL_JSON).write_text(text)
    return folder / MODEL_WEIGHTS


def _checkpoint(path: Path, model: dict | None = None, data: dict | None = None, **extra: object) -> Path:
    """A ``last.pt`` as a run writes it (plain data: torch.save of a dict), its config sections overridden."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {**CONFIG, "output": str(path.parent), "model": {**CONFIG["model"], **(model or {})},
              "data": {**CONFIG["data"], **(data or {})}}
    torch.save({"config": config, "backbone": _backbone().state_dict(), "step": STEP,
                "metrics": {"threshold": 0.3, "accuracy": 0.5}, **extra}, path)
    return path


def _pairs_bin(path: Path, pairs: int = 20, seed: int = 0) -> tuple[Path, list[bool]]:
    from faceforge.data.pairs import write_bin
    from faceforge.data.synthetic import synthetic_pairs

    images, issame = synthetic_pairs(pairs, num_identities=50, image_size=SIZE, split="test", seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bin(path, images, issame)
    return path, [bool(s) for s in issame]


def _exists(path: Path, what: str) -> Callable[[], str]:
    return lambda: f"{what}: **{path.read_text()[:20]!r} written**" if path.exists() else f"{what}: none"


def _accuracy(results: Path, say: str = "accuracy") -> Callable[[], str]:
    def check() -> str:
        if not results.is_file():
            return "no results.json"
        rows = json.loads(results.read_text()).get("results", [])
        return ", ".join(f"{say} {r.get('set')}: {100 * r['accuracy']:.2f} %"
                         + (f" (cached: {r['cached']})" if "cached" in r else "") for r in rows if "accuracy" in r)
    return check


def make_cases(d: Path, tree: str) -> list[Case]:
    """Every case, its inputs written under ``d`` (a folder of its own per tree)."""
    from faceforge.deploy.inference import Gallery, load_model

    d.mkdir(parents=True)
    faces = [d / "a.png", d / "b.png"]
    rng = np.random.default_rng(0)
    for p in faces:
        p.write_bytes(_png(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)))
    pairs, issame = _pairs_bin(d / "pairs.bin")
    verify = lambda model: ["verify", str(model), *map(str, faces)]  # noqa: E731
    cases = [Case("-", "control: `verify` of a valid model.safetensors", verify(_model_files(d / "ok")))]

    # 1: torch.hub:load with a local hubconf.py that leaves a marker when imported
    hub, marker = d / "hub", d / "HUB_RAN"
    hub.mkdir()
    (hub / "hubconf.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('hubconf.py ran')\n"
                                    "def m(**kwargs):\n    raise SystemExit('planted code ran')\n")
    hub_kwargs = {"repo_or_dir": str(hub), "model": "m", "source": "local"}
    cases.append(Case("1", "`verify` of a model.json naming `torch.hub:load` (a local hubconf.py)",
                      verify(_model_files(d / "hub_model", backbone="torch.hub:load", backbone_kwargs=hub_kwargs)),
                      _exists(marker, "marker")))
    marker2 = d / "HUB2_RAN"
    hub2 = d / "hub2"
    hub2.mkdir()
    (hub2 / "hubconf.py").write_text((hub / "hubconf.py").read_text().replace(str(marker), str(marker2)))
    ckpt = _checkpoint(d / "hub_run" / "last.pt", model={"backbone": "torch.hub:load", "kwargs": {**hub_kwargs, "repo_or_dir": str(hub2)}})
    cases.append(Case("1", "`eval` of a last.pt whose config names `torch.hub:load`",
                      ["eval", str(ckpt), "--bin", str(pairs), "--output", str(d / "hub_eval")], _exists(marker2, "marker")))

    # 2: a row-shard placeholder naming a file outside the checkpoint's folder, read by train's init_from
    secret = d / "secret.bin"
    secret.write_bytes(np.ones((CLASSES, DIM), np.float32).tobytes())
    crafted = _checkpoint(d / "download" / "last.pt",
                          head={"weight": {"__row_shard__": str(secret), "shape": [CLASSES, DIM], "dtype": "float32"}})
    import yaml

    (d / "init.yaml").write_text(yaml.safe_dump({**CONFIG, "output": str(d / "mine"),
                                                 "model": {**CONFIG["model"], "init_from": str(crafted)}}))
    cases.append(Case("2", "`train` with `init_from` a last.pt whose head is a row-shard placeholder `/abs/secret.bin`",
                      ["train", str(d / "init.yaml")],
                      lambda: "trained on it: last.pt written" if (d / "mine" / "last.pt").exists() else "no run"))
    outside, _ = _pairs_bin(d / "private" / "mine.bin", pairs=20, seed=5)
    theirs = _checkpoint(d / "theirs" / "last.pt", data={"eval_bins": [str(outside)]})
    cases.append(Case("2", "`eval` of a last.pt whose `data.eval_bins` names a .bin outside its run folder",
                      ["eval", str(theirs), "--pairs", "20", "--output", str(d / "theirs_eval")],
                      _accuracy(d / "theirs_eval" / "results.json", "read")))

    # 3: a planted link at eval's results.md
    victim = d / "victim.txt"
    victim.write_text("the user's own file\n")
    linked = _checkpoint(d / "linked" / "last.pt")
    (d / "linked" / "eval" / f"step_{STEP:07d}").mkdir(parents=True)
    (d / "linked" / "eval" / f"step_{STEP:07d}" / "results.md").symlink_to(victim)
    cases.append(Case("3", "`eval` of a run folder shipping `eval/step_N/results.md -> victim`",
                      ["eval", str(linked), "--bin", str(pairs)],
                      lambda: "victim **overwritten**" if victim.read_text() != "the user's own file\n" else "victim intact"))

    # 4: a feature cache crafted for an untrained model (the same vector for a same pair, orthogonal otherwise)
    cached = _checkpoint(d / "cached" / "last.pt")
    shipped = d / "cached" / "eval" / "shipped"
    perfect = np.zeros((2 * len(issame), DIM), np.float32)
    for k, same in enumerate(issame):
        perfect[2 * k, k % DIM] = perfect[2 * k + 1, (k if same else k + 1) % DIM] = 1
    eval_cached = ["eval", str(cached), "--bin", str(pairs), "--output", str(shipped)]

    def craft_cache(tree: str) -> None:
        """The file names are computable by whoever ships the folder: let the tree name them, then replace the content."""
        import subprocess

        subprocess.run(["bash", "-c", _faceforge(tree, eval_cached)], capture_output=True, check=True)
        for p in shipped.glob("emb_*.npy"):
            np.save(p, perfect)
    cases.append(Case("4", "`eval` with a crafted feature cache `eval/.../emb_<key>.npy` (untrained model)",
                      eval_cached, _accuracy(shipped / "results.json", "claims"), craft_cache))

    # 6 and 11: normalisation and sizes in model.json (r18 at full width for the sizes: the old code built it)
    cases.append(Case("6", "`verify` with model.json `std: [1e-320, 1, 1]`", verify(_model_files(d / "std", std=[1e-320, 1.0, 1.0]))))
    for name, meta in (("emb40", {"embedding_size": 2**40}), ("emb17", {"embedding_size": 2**17, "image_size": 112}),
                       ("img2048", {"embedding_size": 512, "image_size": 2048})):
        what = ", ".join(f"{k} {v if v < 2**16 else '2**%d' % (v.bit_length() - 1)}" for k, v in meta.items())
        cases.append(Case("11", f"`verify` with model.json naming r18, {what}",
                          verify(_model_files(d / name, backbone_kwargs={}, **meta))))

    # 14: gallery.json; 25: a truncated index.faiss
    model = d / "ok" / "model.safetensors"
    fingerprint = load_model(model).fingerprint()
    for name in ("list", "ab", "trunc"):
        Gallery(np.eye(DIM, dtype=np.float32)[:2], ["a", "b"], ["a.png", "b.png"], model="m",
                fingerprint=fingerprint).save(d / name)
    meta = json.loads((d / "list" / "gallery.json").read_text())
    (d / "list" / "gallery.json").write_text(json.dumps([meta]))
    (d / "ab" / "gallery.json").write_text(json.dumps({**meta, "identities": "ab"}))
    index = (d / "trunc" / "index.faiss").read_bytes()
    (d / "trunc" / "index.faiss").write_bytes(index[: len(index) // 2])
    search = lambda g: ["search", str(model), str(d / g), str(faces[0])]  # noqa: E731
    cases.append(Case("14", "`search` with a gallery.json that is a top-level list", search("list")))
    cases.append(Case("14", '`search` with gallery.json `"identities": "ab"`', search("ab")))
    cases.append(Case("25", "`search` with index.faiss cut to half its bytes", search("trunc")))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=None, help="an older tree to run the same inputs against (default: none)")
    parser.add_argument("--after", default=os.getcwd(), help="the tree to measure (default: the current folder)")
    parser.add_argument("--limit-gb", type=float, default=4.0, help="ulimit -v of each case (default 4)")
    parser.add_argument("--timeout", type=int, default=90, help="seconds per case (default 90)")
    parser.add_argument("--only", default=None, help="run only the cases whose item is in this comma list")
    args = parser.parse_args()
    trees = {"before": args.before, "after": args.after} if args.before else {"after": args.after}
    print(f"load average before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows: dict[str, list[str]] = {}
        for label, tree in trees.items():
            for case in make_cases(Path(tmp) / label, tree):
                if args.only and case.item not in args.only.split(","):
                    continue
                if case.prepare is not None:
                    case.prepare(tree)
                code, seconds, mb, last = run(_faceforge(tree, case.argv), int(args.limit_gb * 2**20), args.timeout)
                left = case.check()
                quoted = "" if "%|" in last else f": `{last.replace(tmp, 'D')[:150]}`"  # a progress bar says nothing
                cell = f"exit {code}, {seconds:.1f} s, {mb:.0f} MB{'; ' + left if left else ''}{quoted}"
                rows.setdefault(f"{case.item} | {case.what}", []).append(cell)
                print(f"[{label}] {case.item} {case.what}: {cell}", file=sys.stderr, flush=True)
        print(f"load average after: {os.getloadavg()}")
        print("| item | input | " + " | ".join(trees) + " |\n| --- | --- |" + " --- |" * len(trees))
        for key, cells in rows.items():
            print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
