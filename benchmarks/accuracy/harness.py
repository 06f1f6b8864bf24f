"""The accuracy harness: train heads under equal budgets and several seeds, tabulate held-out verification.

    python benchmarks/accuracy/harness.py                          # table6, table3, noise; both datasets; 3 seeds
    python benchmarks/accuracy/harness.py --experiments table6 --datasets glyphs --seeds 1 --only Softmax ArcFace
    python benchmarks/accuracy/harness.py --full                   # the GPU size
    python benchmarks/accuracy/harness.py --size many --experiments attfc_ratio attfc_k attfc_weighting partial_fc
    python benchmarks/accuracy/harness.py --report-only            # tables and plots from finished runs
    python benchmarks/accuracy/harness.py --list                   # the experiments and their variants
    python benchmarks/accuracy/harness.py --experiments broadface_queue broadface_curve broadface_retrieval broadface_cosface

Every run goes through the real trainer (``faceforge.train.train``) in this process, then the harness
scores its backbone on the held-out gallery (``gallery.py``). A run is keyed by its full resolved config
(plus the gallery protocol): its folder is ``OUT/runs/<key>/`` and it is finished when ``result.json``
there holds that key. A rerun skips finished runs, resumes a killed run from its ``last.pt``, and never
mistakes a changed config for a finished run (the key changes). Runs shared by experiments (the CosFace of
Table 6 is the 0 % point of the label-noise figure) train once. The BroadFace experiments fine-tune: each
run starts from the checkpoint of a table6 run of its dataset and seed (``Experiment.init_from``), which
the harness runs first (or again, if its checkpoint was deleted) and keeps; the dependent run's key holds
that run's key.

Outputs in OUT (default ``runs/accuracy/<size>``): ``report.md`` (Markdown tables, mean ± std over seeds),
``results.json`` (every run: experiment, dataset, variant, seed, key, metrics, timings, curve),
``plots/*.png`` and, for the glyph dataset, ``glyph_fonts.txt`` (the font report).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Sequence

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import experiments as ex  # noqa: E402
import gallery  # noqa: E402
import tables  # noqa: E402

from faceforge.core.fileio import atomic_open  # noqa: E402
from faceforge.core.checkpoint import CHECKPOINT_NAME, THRESHOLD_KEY, load_checkpoint  # noqa: E402
from faceforge.train.config import Config, apply_overrides, config_from_dict, to_dict  # noqa: E402

RESULT_NAME = "result.json"
HARNESS_VERSION = 1  # bump when the protocol changes in a way the config does not show


@dataclass(frozen=True)
class Run:
    """One (experiment, dataset, variant, seed) and its resolved config and key."""

    experiment: str
    dataset: str
    variant: ex.Variant
    seed: int
    cfg: Config
    key: str
    gallery: dict[str, int]
    curve: bool
    start: Run | None = None  # the run whose checkpoint this one starts from (Experiment.init_from)
    teacher: Run | None = None  # the run whose checkpoint teaches this one (Variant.teacher)
    masked: bool = False  # also score the gallery with one side of every pair masked (Experiment.masked)
    degraded: bool = False  # ... and with one side degraded (Experiment.degraded, --degraded)

    @property
    def folder(self) -> Path:
        return Path(self.cfg.output)

    @property
    def depends(self) -> tuple[Run, ...]:
        """The runs whose checkpoints this one reads: they run first and keep their checkpoints."""
        return tuple(run for run in (self.start, self.teacher) if run is not None)

    def describe(self) -> str:
        return f"{self.experiment} / {self.dataset} / {self.variant.label} / seed {self.seed}"


def run_of(size: str, dataset: str, experiment: str, seed: int, out: Path, ref: tuple[str, str] | None,
           what: str = "init_from") -> Run | None:
    """The run ``ref`` = (experiment, variant label) names (an ``init_from`` or a teacher: same size, dataset and
    seed), or None when ``ref`` is None."""
    if ref is None:
        return None
    name, label = ref
    if name not in ex.EXPERIMENTS:
        raise ValueError(f"experiment {experiment!r}: {what} {ref}: no experiment {name!r}; "
                         f"expected one of {sorted(ex.EXPERIMENTS)}")
    variants = {v.label: v for v in ex.EXPERIMENTS[name].variants_for(size)}
    if label not in variants:
        raise ValueError(f"experiment {experiment!r}: {what} {ref}: {name!r} has no variant {label!r} "
                         f"at size {size!r}; expected one of {sorted(variants)}")
    return resolve(size, dataset, name, variants[label], seed, out)


def start_of(size: str, dataset: str, experiment: str, seed: int, out: Path) -> Run | None:
    """The run that ``experiment``'s runs start from (its ``init_from``: same size, dataset and seed), or None."""
    return run_of(size, dataset, experiment, seed, out, ex.EXPERIMENTS[experiment].init_from)


def unlabelled_folder(out: Path, dataset: str, seed: int, count: int) -> Path:
    """Where a (dataset, seed)'s ``count`` unlabelled images are written (``gallery.write_unlabelled``)."""
    return out / "unlabelled" / f"{dataset}-seed{seed}-{count}"


def resolve(size: str, dataset: str, experiment: str, variant: ex.Variant, seed: int, out: Path,
            degraded: bool = False) -> Run:
    """The run's config (base, data section, experiment, variant, seed, the checkpoint it starts from) and
    its key. A run that starts from another is keyed by that run's key, not by where OUT is. ``degraded``: score
    degraded pairs too, whatever the experiment says (extra metrics: the key does not change)."""
    exp = ex.EXPERIMENTS[experiment]
    start = start_of(size, dataset, experiment, seed, out)
    teacher = run_of(size, dataset, experiment, seed, out, variant.teacher, "teacher")
    data = copy.deepcopy({**ex.BASE[size], "data": ex.DATASETS[dataset][size]})
    overrides = [*exp.overrides_for(size), *variant.overrides, f"seed={seed}"]
    if exp.curve:
        curve = ex.CURVE[size]
        overrides += [f"train.eval_every={curve['every']}", f"data.eval_pairs={curve['pairs']}"]
    if start is not None:
        overrides.append(f"model.init_from={start.folder / CHECKPOINT_NAME}")
    if teacher is not None:
        overrides.append(f"objective.kwargs.teacher={teacher.folder / CHECKPOINT_NAME}")
    if variant.unlabelled:
        overrides.append(f"data.unlabelled={unlabelled_folder(out, dataset, seed, variant.unlabelled)}")
    data = apply_overrides({"output": "", "head": {"name": "unset"}, **data}, overrides, f"{experiment}/{variant.label}")
    cfg = config_from_dict(data, f"accuracy harness: {experiment} / {dataset} / {variant.label}")
    plain = to_dict(cfg)
    plain.pop("output")
    # keyed by what the paths hold, not by where OUT is
    if start is not None:
        plain["model"]["init_from"] = f"run {start.key}"
    if teacher is not None:
        plain["objective"]["kwargs"]["teacher"] = f"run {teacher.key}"
    if variant.unlabelled:
        plain["data"]["unlabelled"] = f"{variant.unlabelled} generated images, seed {seed}"
    blob = json.dumps({"config": plain, "gallery": ex.GALLERY[size], "version": HARNESS_VERSION}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    cfg.output = str(out / "runs" / key)
    masked = exp.masked and dataset in gallery.MASKABLE
    return Run(experiment, dataset, variant, seed, cfg, key, ex.GALLERY[size], exp.curve, start, teacher, masked,
               degraded or exp.degraded)


def plan(size: str, experiments: Sequence[str], datasets: Sequence[str], seeds: int, out: Path,
         only: Sequence[str] = (), degraded: bool = False) -> list[Run]:
    """Every run, in the order experiments x datasets x seeds x variants (all heads of a seed together); an
    experiment declared for some datasets only (``Experiment.datasets``) skips the others."""
    return [
        resolve(size, dataset, name, variant, seed, out, degraded)
        for name in experiments
        for dataset in datasets
        if not ex.EXPERIMENTS[name].datasets or dataset in ex.EXPERIMENTS[name].datasets
        for seed in range(seeds)
        for variant in ex.EXPERIMENTS[name].variants_for(size)
        if not only or variant.label in only
    ]


def missing_heads(cfg: Config) -> list[str]:
    """Head names the config needs (``head.name`` and a wrapped ``head.kwargs.head``) that are not registered."""
    from faceforge.heads import HEADS

    names = [cfg.head.name, cfg.head.kwargs.get("head")]
    return [n for n in names if isinstance(n, str) and ":" not in n and n not in HEADS]


def read_result(run: Run) -> dict[str, Any] | None:
    """The finished result of ``run``, or None (absent, unreadable, or written for another key)."""
    path = run.folder / RESULT_NAME
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("key") == run.key else None


_EVAL_LINE = re.compile(r"eval step (\d+): (.*)$")
_DIAGNOSTICS_LINE = re.compile(r"diagnostics step (\d+): (?!none$)(.*)$")


def _step_lines(log: Path, pattern: re.Pattern[str]) -> list[dict[str, float]]:
    """``[{"step": N, name: value, ...}]`` from the ``... step N: name value name value`` lines of ``log``
    that ``pattern`` matches, by step (a resumed run logs a step twice: the last wins)."""
    if not log.is_file():
        return []
    by_step: dict[int, dict[str, float]] = {}
    for line in log.read_text().splitlines():
        match = pattern.search(line)
        if match:
            tokens = match.group(2).split()
            if len(tokens) % 2:
                raise ValueError(f"{log}: {line!r}: expected 'name value' pairs after the step")
            values = {k: float(v) for k, v in zip(tokens[0::2], tokens[1::2])}
            by_step[int(match.group(1))] = {"step": float(match.group(1)), **values}
    return [by_step[step] for step in sorted(by_step)]


def learning_curve(log: Path) -> list[dict[str, float]]:
    """The trainer's ``eval step N: name value ...`` lines of ``train.log``: ``[{"step": N, name: value}]``."""
    return _step_lines(log, _EVAL_LINE)


def diagnostics(log: Path) -> list[dict[str, float]]:
    """The head's ``diagnostics step N: cos_error x cos_error_compensated y samples k`` lines of ``train.log``
    (BroadFace Fig. 5a), like :func:`learning_curve`; a ``none`` line (no queued sample ids yet) is skipped."""
    return _step_lines(log, _DIAGNOSTICS_LINE)


def execute(run: Run, keep_checkpoint: bool = False) -> dict[str, Any]:
    """Train (resuming from ``last.pt`` if there is one), score the gallery, write ``result.json``.

    The gallery is also scored at the checkpoint's ``verification_threshold`` when the head has one
    (SphereFace2's learned threshold: ``fixed_threshold`` / ``fixed_threshold_accuracy``).
    """
    from faceforge.build import ENCODERS, load_backbone
    from faceforge.train import train

    if run.variant.unlabelled:
        gallery.write_unlabelled(run.cfg, run.variant.unlabelled, Path(run.cfg.data.unlabelled))
    start, cpu = time.perf_counter(), time.process_time()
    result = train(run.cfg, resume=True)  # from its last.pt, or from step 0 in the folder of a run killed before one
    trained, trained_cpu = time.perf_counter() - start, time.process_time() - cpu
    state = load_checkpoint(result.checkpoint)
    start = time.perf_counter()
    images, labels = gallery.held_out_gallery(run.cfg, run.gallery["per_identity"])
    metrics: dict[str, float] = {}
    # the trained backbone; then every other encoder the checkpoint holds (AttFC's momentum class encoder),
    # its metrics under "<encoder>/<metric>"
    for name, module in ENCODERS.items():
        owned = module == "backbone" or any(k.startswith(f"{module}.") for k in state.get("objective", {}))
        if not owned:
            continue
        backbone, _ = load_backbone(state, source=str(result.checkpoint), encoder=name)
        averaged = state.get("extra", {}).get("ema", {}).get("backbone") if module == "backbone" else None
        if averaged is not None:  # train.ema: the average is the model (what the trainer evaluates and exports)
            backbone.load_state_dict(averaged)
        scored = gallery.evaluate_gallery(backbone, images, labels, run.gallery["pairs"], run.cfg.seed,
                                          batch_size=run.cfg.data.eval_batch_size,
                                          threshold=state.get(THRESHOLD_KEY))
        prefix = "" if module == "backbone" else f"{name}/"
        metrics.update({prefix + key: value for key, value in scored.items()})
        if run.masked and module == "backbone":
            masked = gallery.evaluate_masked(backbone, images, labels, run.gallery["pairs"], run.cfg.seed,
                                             batch_size=run.cfg.data.eval_batch_size)
            metrics.update({f"masked/{key}": value for key, value in masked.items()})
        if run.degraded and module == "backbone":
            degraded = gallery.evaluate_degraded(backbone, images, labels, run.gallery["pairs"], run.cfg.seed,
                                                 batch_size=run.cfg.data.eval_batch_size)
            metrics.update({f"degraded/{key}": value for key, value in degraded.items()})
        if module == "backbone":
            parameters = sum(p.numel() for p in backbone.parameters())
    record = {
        "key": run.key,
        "config": to_dict(run.cfg),
        "init_from": run.start.key if run.start is not None else None,
        "metrics": metrics,
        "backbone_parameters": parameters,
        "trainer_metrics": result.metrics,
        "final_loss": result.losses[-1] if result.losses else None,
        "steps": result.step,
        "train_seconds": trained,
        "train_cpu_seconds": trained_cpu,  # all threads; less sensitive than wall time to a busy machine
        "eval_seconds": time.perf_counter() - start,
        "images_per_second": result.images_per_second,
        "curve": learning_curve(result.log) if run.curve else [],
        "diagnostics": diagnostics(result.log) if run.cfg.train.diagnostics_every else [],
    }
    with atomic_open(run.folder / RESULT_NAME, "w") as f:
        json.dump(record, f, indent=1)
    if not keep_checkpoint:
        for path in (result.checkpoint, *run.folder.glob("step_*.pt")):
            path.unlink(missing_ok=True)
    return record


def _summary(run: Run, record: dict[str, Any]) -> str:
    m = record["metrics"]
    return (f"acc {100 * m['accuracy']:.2f} %  TAR@1e-3 {100 * m['tar@far=1e-03']:.2f} %  "
            f"TAR@1e-4 {100 * m['tar@far=1e-04']:.2f} %  R@1 {100 * m['recall@1']:.2f} %  "
            f"({record['train_seconds']:.0f} s train, {record['eval_seconds']:.0f} s eval)")


def _compared(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Whether a run trained again reproduced its earlier metrics (the ones both results have)."""
    old, new = before["metrics"], after["metrics"]
    changed = {k: (old[k], new[k]) for k in sorted(set(old) & set(new)) if old[k] != new[k]}
    if not changed:
        return "trained again: the earlier metrics reproduced exactly"
    return "trained again: the earlier metrics changed: " + ", ".join(f"{k} {a:.6g} -> {b:.6g}" for k, (a, b) in changed.items())


def run_all(runs: Sequence[Run], keep_checkpoints: bool = False, log=print,
            redo: Collection[str] = ()) -> list[tuple[Run, dict[str, Any] | None]]:
    """Execute every unfinished run (each key once), after the run it starts from; returns
    ``(run, record or None if skipped)``.

    A run that another starts from (``Run.start``) keeps its checkpoint; one that finished before without
    it is trained again, and so are the runs whose keys are in ``redo`` (to record metrics added since); the
    new result replaces the old and the log says whether the earlier metrics reproduced.
    """
    keep = {dep.key for run in runs for dep in run.depends}
    records: dict[str, dict[str, Any] | None] = {}

    def finish(run: Run, where: str) -> dict[str, Any] | None:
        if run.key in records:
            return records[run.key]
        records[run.key] = None
        for dep in run.depends:
            if finish(dep, f"{where}, its {'teacher' if dep is run.teacher else 'init_from'} {dep.describe()}") is None:
                log(f"{where}: skipped, the run it needs ({dep.describe()}) did not run")
                return None
        missing = missing_heads(run.cfg)
        if missing:
            log(f"{where}: skipped, head {', '.join(map(repr, missing))} is not registered in faceforge.heads")
            return None
        before = read_result(run)
        again = (run.key in redo or (run.key in keep and not (run.folder / CHECKPOINT_NAME).is_file())
                 or (run.masked and before is not None and "masked/accuracy" not in before["metrics"])
                 or (run.degraded and before is not None and "degraded/accuracy" not in before["metrics"]))
        if before is not None and not again:
            log(f"{where}: done before ({run.key}): {_summary(run, before)}")
            records[run.key] = before
            return before
        record = execute(run, keep_checkpoints or run.key in keep)
        log(f"{where}: {_summary(run, record)}" + (f"; {_compared(before, record)}" if before is not None else ""))
        records[run.key] = record
        return record

    return [(run, finish(run, f"[{i}/{len(runs)}] {run.describe()}")) for i, run in enumerate(runs, 1)]


def _write_font_report(cfg: Config, out: Path) -> None:
    from faceforge.train.data import glyph_benchmark_of

    bench = glyph_benchmark_of(cfg)
    report = bench.selection.report()
    split = (f"training: {len(bench.train_chars)} characters x {bench.images_per_character} images; test: "
             f"{len(bench.test_chars)} characters x {len(bench.test_fonts)} fonts "
             f"({'held-out families' if cfg.data.kwargs['glyph_held_out_families'] else 'the training fonts'}); "
             f"skipped characters: {bench.skipped}")
    with atomic_open(out / "glyph_fonts.txt", "w") as f:
        f.write(f"{report}\n{split}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=list(ex.DEFAULT_EXPERIMENTS), choices=sorted(ex.EXPERIMENTS))
    parser.add_argument("--datasets", nargs="+", default=list(ex.DEFAULT_DATASETS), choices=sorted(ex.DATASETS))
    parser.add_argument("--seeds", type=int, default=ex.DEFAULT_SEEDS, help="seeds 0 .. N-1 (default 3)")
    parser.add_argument("--size", choices=ex.SIZES, default="default",
                        help="default: 500 classes on a 2-core CPU; many: 5,000 classes (AttFC, Partial FC); "
                             "full: one GPU")
    parser.add_argument("--full", action="store_true", help="the GPU size (= --size full)")
    parser.add_argument("--only", nargs="+", default=[], metavar="LABEL", help="run only these variant labels")
    parser.add_argument("--out", type=Path, help="output folder (default runs/accuracy/<size>)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's last.pt")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of this process (default 1: run one harness per core; two threads "
                             "each of several harnesses on 2 cores ran 5-15x slower, their OpenMP threads spinning)")
    parser.add_argument("--redo", nargs="+", default=[], metavar="LABEL",
                        help="train these variants again even if finished (to record metrics added since)")
    parser.add_argument("--report-only", action="store_true", help="tabulate finished runs, train nothing")
    parser.add_argument("--list", action="store_true", help="print the experiments and their variants")
    parser.add_argument("--degraded", action="store_true",
                        help="also score every run with the second side of each pair degraded (low resolution and "
                             "blur, faceforge.data.degrade): degraded/<metric> in results.json, degraded columns in "
                             "the tables; a finished run without them is trained again")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = "full" if args.full else args.size
    if args.list:
        for name, exp in ex.EXPERIMENTS.items():
            print(f"{name}: {exp.title}")
            if exp.overrides_for(size) or exp.init_from:
                start = f"; each run starts from {' / '.join(exp.init_from)}" if exp.init_from else ""
                print(f"    (every variant) {' '.join(exp.overrides_for(size))}{start}")
            for v in exp.variants_for(size):
                print(f"    {v.label:28s} {' '.join(v.overrides)}")
        return 0
    out = args.out or Path("runs") / "accuracy" / size
    runs = plan(size, args.experiments, args.datasets, args.seeds, out, args.only, args.degraded)
    if not runs:
        parser.error(f"no variant matches --only {' '.join(args.only)}")
    print(f"accuracy harness: size {size}, {len(runs)} runs ({len({r.key for r in runs})} distinct) -> {out}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    if "glyphs" in args.datasets and not args.report_only:  # report-only needs neither fonts nor rendering
        _write_font_report(next(r.cfg for r in runs if r.dataset == "glyphs"), out)
    if args.report_only:
        done = [(run, read_result(run)) for run in runs]
    else:
        redo = {run.key for run in runs if run.variant.label in args.redo}
        done = run_all(runs, args.keep_checkpoints, log=lambda line: print(line, flush=True), redo=redo)
    paths = tables.write_report(done, out, size)
    print("\n".join(f"wrote {p}" for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
