"""`faceforge eval`: `faceforge train` checkpoints on any evaluation sets, side by side, with reports.

The one module besides ``cli.py`` that knows both a training config (to rebuild a checkpoint's backbone
and its held-out sets) and the evaluation library (:mod:`faceforge.eval.sets`).

What runs is an :class:`EvalRequest`: ``.bin`` pair sets, an IJB-B/C release, probes searched among
distractors, a retrieval set; with none of these, each checkpoint's own held-out sets (its config's
synthetic pairs or ``data.eval_bins``). ``EVALUATIONS`` maps each request field to the sets it builds.

Every run writes into its output folder: ``results.md`` (one table per kind of set, after a line saying whether
the test-time flip was used; printed too), ``results.json`` (every number, per checkpoint and set), ``roc.png``
(every curve, log FPR), with ``--quality`` ``error_vs_reject.png`` beside it (:mod:`faceforge.eval.quality`),
``hist_<set>.png`` (positive / negative pair scores; ``hist_<checkpoint>_<set>.png``
when comparing) and the features as ``emb_<checkpoint>_<set>_<data>[_<part>].npy``, keyed by the
checkpoint's content hash and the set's data: a re-run re-scores from them without running the model.
A cache is read only when this installation wrote it (``<file>.hmac``, a keyed hash with the key in the
user's own cache folder, :func:`faceforge.core.fileio.is_signed`); one that came with a run folder is ignored,
and the report says which features came from a cache.

A checkpoint is data: evaluating one reads only the sets named on the command line, or the held-out sets
of its config whose files lie inside its own run folder (``data.eval_bins`` elsewhere, or a glyph font
folder elsewhere, is refused with the ``--bin`` to use instead).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from faceforge.eval.metrics import PairCounts
from faceforge.eval.quality import error_versus_reject, pair_quality
from faceforge.eval.report import (
    FPR_RANGE,
    UNRESOLVED,
    far_resolved,
    markdown_table,
    plot_error_versus_reject,
    plot_roc,
    score_histogram,
    unresolved_note,
)
from faceforge.eval.sets import (
    DEGRADED_SUFFIX,
    DISTRACTOR_COUNTS,
    VERIFICATION_FARS,
    DistractorSet,
    EvalSet,
    IJBSet,
    ImageNorms,
    PairSet,
    RetrievalSet,
    SetScores,
    _pct,
    degraded_pair_set,
)
from faceforge.eval.finite import require_finite
from faceforge.core.fileio import is_signed, save_npy, sign_file, write_text
from faceforge.core.checkpoint import CHECKPOINT_NAME, THRESHOLD_KEY

if TYPE_CHECKING:
    from faceforge.deploy.modelfile import ModelInfo

__all__ = ["EVALUATIONS", "EVAL_FARS", "EvalRequest", "evaluate_checkpoint", "evaluate_checkpoints"]

EVAL_FARS = VERIFICATION_FARS
# besides `faceforge train` checkpoints: model files that faceforge.load_model reads (docs/inference.md)
MODEL_FILE_SUFFIXES = (".onnx", ".safetensors")


@dataclass
class EvalRequest:
    """The sets to evaluate (each field is a ``faceforge eval`` option of the same name).

    bins: insightface ``.bin`` files. ijb / ijb_name / ijb_faceness / ijb_protocol: an IJB-B/C release root,
    ``IJBB`` or ``IJBC``, faceness-weighted templates (default: only under the insightface protocol), and
    how the numbers are read ("faceforge" or "insightface", :class:`faceforge.eval.sets.IJBSet`). probes / distractors / distractor_counts: identification
    of a labelled image set among distractors (both required together). retrieval /
    retrieval_test_fraction: retrieval on a labelled image set, or on a class-disjoint fraction of it.
    num_pairs: held-out pairs when a checkpoint's own sets are used (none of the above); None: the run's
    own ``data.eval_pairs``, so that eval and training report the same pairs. fars: of the
    pair sets. batch_size: images per forward pass. encoder: which of a checkpoint's encoders embeds,
    "query" (the trained backbone) or "momentum" (AttFC's class encoder; ``faceforge.build.ENCODERS``).
    masked: every 1:1 pair set is also scored with the second image of each pair masked
    (:func:`masked_pair_set`), beside the unmasked one. degraded: the same with the second image degraded (low
    resolution and blur at fixed levels, :func:`faceforge.eval.sets.degraded_pair_set`). flip: embed with the
    test-time flip, ``f(x) + f(flip(x))`` (default), else ``f(x)``. quality: an error-versus-reject report of every
    pair set (:mod:`faceforge.eval.quality`): ``"norm"`` reads each image's quality as the model's embedding norm
    (:class:`~faceforge.eval.sets.ImageNorms`), a ``.npy`` path gives the qualities of one pair set's images
    (``(2N,)``, in its image order) or pairs (``(N,)``).
    """

    bins: Sequence[str] = ()
    ijb: str | None = None
    ijb_name: str = "IJBC"
    ijb_faceness: bool | None = None
    ijb_protocol: str = "faceforge"
    probes: str | None = None
    distractors: str | None = None
    distractor_counts: Sequence[int] = DISTRACTOR_COUNTS
    retrieval: str | None = None
    retrieval_test_fraction: float | None = None
    num_pairs: int | None = None
    fars: Sequence[float] = EVAL_FARS
    batch_size: int = 256
    encoder: str = "query"
    masked: bool = False
    degraded: bool = False
    flip: bool = True
    quality: str | None = None


NORM_QUALITY = "norm"  # EvalRequest.quality: each image's quality is the model's embedding norm
MASK_SEED = 0  # the masks of `faceforge eval --masked`: fixed, so every checkpoint meets the same masked pairs


def masked_pair_set(s: PairSet, seed: int = MASK_SEED) -> PairSet:
    """``s`` with the second image of every pair masked (the MFR protocol: an unmasked face against a masked
    one), named ``"<name> (masked)"``; pair ``k``'s mask is a function of ``(seed, k)`` (``faceforge.data.masks``)."""
    from faceforge.data.masks import mask_images_uint8

    images = np.array(s.images, dtype=np.uint8, copy=True)
    images[1::2] = mask_images_uint8(images[1::2], seed, np.arange(len(s.issame)))
    return PairSet(f"{s.name} (masked)", images, s.issame, fars=s.fars, flip=s.flip)


@dataclass(frozen=True)
class Twin:
    """A copy of every 1:1 pair set with the second image of each pair changed (an :class:`EvalRequest` flag):
    how it is built, the suffix of its name, its side-by-side table's title and the words for both columns."""

    build: Callable[[PairSet], PairSet]
    suffix: str
    title: str
    clean: str
    changed: str


# EvalRequest flag -> its twin sets (``--masked``, ``--degraded``)
TWINS: dict[str, Twin] = {
    "masked": Twin(masked_pair_set, " (masked)", "Masked verification (MFR style: the second image of every pair "
                   "masked)", "unmasked", "masked"),
    "degraded": Twin(degraded_pair_set, DEGRADED_SUFFIX, "Degraded verification (mixed quality: the second image of "
                     "every pair at low resolution and blurred)", "clean", "degraded"),
}


def _with_twins(sets: list[EvalSet], r: EvalRequest) -> list[EvalSet]:
    """Each pair set followed by its twin of every :data:`TWINS` flag ``r`` sets; a ValueError when there is no
    pair set to change."""
    asked = [flag for flag in TWINS if getattr(r, flag)]
    if not asked:
        return sets
    if not any(isinstance(s, PairSet) for s in sets):
        raise ValueError(f"--{asked[0]} changes one image of every 1:1 pair: give --bin sets, or no set option to use "
                         "the checkpoint's held-out pairs (IJB, identification and retrieval are not changed)")
    return [t for s in sets for t in ((s, *(TWINS[f].build(s) for f in asked)) if isinstance(s, PairSet) else (s,))]


def _twin_rows(results: dict[tuple[str, str], SetScores], twin: Twin) -> list[tuple[str, dict[str, object]]]:
    """One row per checkpoint and pair set scored both ways: the clean and changed numbers side by side."""
    rows = []
    for (label, name), changed in results.items():
        plain = results.get((label, name.removesuffix(twin.suffix)))
        if not name.endswith(twin.suffix) or plain is None or changed.result is None or plain.result is None:
            continue
        a, b = plain.result, changed.result
        row: dict[str, object] = {
            "model": f"{label} on {name.removesuffix(twin.suffix)}",
            f"10-fold accuracy, {twin.clean}": f"{100 * a.accuracy:.2f} %",
            f"10-fold accuracy, {twin.changed}": f"{100 * b.accuracy:.2f} %",
        }
        for far in (1e-3, 1e-2):
            if far in a.tar_at_far:  # unresolved below 1 / FAR negative pairs: "—", the pair table says why
                resolved = far_resolved(far, a.negative_pairs)
                row[f"TAR@FAR={far:.0e}, {twin.clean}"] = _pct(a.tar_at_far[far]) if resolved else UNRESOLVED
                row[f"TAR@FAR={far:.0e}, {twin.changed}"] = _pct(b.tar_at_far[far]) if resolved else UNRESOLVED
        row.update({f"EER, {twin.clean}": _pct(a.eer), f"EER, {twin.changed}": _pct(b.eer)})
        rows.append((twin.title, row))
    return rows


def _bin_sets(r: EvalRequest) -> list[EvalSet]:
    from faceforge.data.pairs import load_bins

    sets = load_bins(r.bins)
    return [PairSet(name, images, issame, fars=r.fars, source=str(path), flip=r.flip)
            for path, (name, (images, issame)) in zip(r.bins, sets.items())]


def _identification_sets(r: EvalRequest) -> list[EvalSet]:
    if (r.probes is None) != (r.distractors is None):
        raise ValueError("identification needs both --probes (a labelled image set) and --distractors "
                         f"(an image set), got probes={r.probes!r}, distractors={r.distractors!r}")
    return [DistractorSet(r.probes, r.distractors, counts=r.distractor_counts, flip=r.flip)] if r.probes else []


# request -> the sets it asks for; built once, shared by every checkpoint
EVALUATIONS: dict[str, Callable[[EvalRequest], list[EvalSet]]] = {
    "bins": _bin_sets,
    "ijb": lambda r: [IJBSet(r.ijb, r.ijb_name, faceness=r.ijb_faceness, protocol=r.ijb_protocol, flip=r.flip)]
    if r.ijb else [],
    "identification": _identification_sets,
    "retrieval": lambda r: [RetrievalSet(r.retrieval, r.retrieval_test_fraction, flip=r.flip)] if r.retrieval else [],
}


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _file_key(path: Path) -> str:
    """A content hash of a checkpoint file: the cache key of its features."""
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_checkpoint(path: str | Path) -> Path:
    """The file a user named as a model to evaluate: a run folder gives its ``last.pt`` (its config brings the
    held-out sets), else its ``model.safetensors``; a file is itself (``last.pt``, ``.safetensors``, ``.onnx``).
    FileNotFoundError when neither exists."""
    from faceforge.deploy.modelfile import ModelFileError, resolve_model_path

    p = Path(path)
    if p.is_dir() and (p / CHECKPOINT_NAME).is_file():
        return p / CHECKPOINT_NAME
    try:
        return resolve_model_path(p)
    except ModelFileError as e:
        raise FileNotFoundError(f"checkpoint not found: {e}") from None


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (links resolved) lies inside ``folder``."""
    return path.resolve().is_relative_to(folder.resolve())


def confine_to_run(cfg: object, checkpoint: Path) -> None:
    """Refuse a checkpoint config that names data outside its own run folder (``data.eval_bins``; a glyph
    ``data.path``): a downloaded checkpoint must not make eval read files it chose. ValueError naming the key."""
    run = checkpoint.parent
    d = cfg.data
    for path in d.eval_bins or ():
        if not _inside(Path(path), run):
            raise ValueError(f"{checkpoint}: data.eval_bins names {str(path)[:200]!r}, outside the run folder {run}; "
                             "eval reads only sets given on the command line or inside the run: pass it with --bin")
    if d.name == "glyphs" and d.path and not _inside(Path(d.path), run):
        raise ValueError(f"{checkpoint}: data.path names the font folder {str(d.path)[:200]!r}, outside the run "
                         f"folder {run}; eval reads only sets given on the command line or inside the run: "
                         "pass pairs with --bin")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "set"


def _labels(checkpoints: Sequence[Path]) -> list[str]:
    """Short distinct names of checkpoints: the file name, else parent/name, else the whole path."""
    for make in (lambda p: p.name, lambda p: f"{p.parent.name}/{p.name}", lambda p: str(p)):
        labels = [make(p) for p in checkpoints]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{p}" for i, p in enumerate(checkpoints)]


@dataclass
class _Checkpoint:
    """A checkpoint file: its config, content key, the model's threshold (``threshold``, with where it came from:
    ``threshold_source``; the one its ``model.json`` carries) and (built on demand) backbone."""

    path: Path
    label: str
    encoder: str = "query"
    key: str = ""
    state: dict = field(default_factory=dict, repr=False)
    _model: torch.nn.Module | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from faceforge.core.checkpoint import load_checkpoint
        from faceforge.train.config import config_from_dict

        self.key = _file_key(self.path) + ("" if self.encoder == "query" else f"-{_safe(self.encoder)}")
        if self.path.suffix.lower() in MODEL_FILE_SUFFIXES:  # model.safetensors, exported or foreign ONNX
            from faceforge.deploy.inference import as_backbone, load_model

            recognizer = load_model(self.path)
            self._info = recognizer.info
            self.cfg, self.image_size, self.threshold = None, recognizer.image_size, recognizer.info.threshold
            self.threshold_source = recognizer.info.threshold_source
            self._model = as_backbone(recognizer)
            return
        self.state = load_checkpoint(self.path)
        if "config" not in self.state or "backbone" not in self.state:
            raise ValueError(f"{self.path}: not a `faceforge train` checkpoint (no 'config' / 'backbone' entry)")
        if self.encoder != "query":
            self.model()  # a checkpoint without that encoder is refused before any work
        self.cfg = config_from_dict(self.state["config"], source=str(self.path))
        t = self.state.get(THRESHOLD_KEY)
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)):
            raise ValueError(f"{self.path}: {THRESHOLD_KEY!r} must be a finite float, got {repr(t)[:100]}")
        from faceforge.deploy.modelfile import threshold_from_run

        metrics = self.state.get("metrics")  # as `faceforge export` / model.json take it: every format, one threshold
        self.threshold, self.threshold_source, _ = threshold_from_run(metrics if isinstance(metrics, dict) else None, t)
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"{self.path}: metrics: threshold {self.threshold!r}; expected a finite cosine")
        self.image_size = self.cfg.data.image_size

    def model(self) -> torch.nn.Module:
        if self._model is None:
            from faceforge.build import load_backbone

            self._model, _ = load_backbone(self.state, source=str(self.path), encoder=self.encoder)
        return self._model

    def held_out_sets(self, r: EvalRequest) -> list[EvalSet]:
        """The config's own verification sets (synthetic held-out pairs, or its ``data.eval_bins``)."""
        from faceforge.train.data import build_verification_sets

        if self.cfg is None:
            raise ValueError(f"{self.path}: a model file carries no held-out sets; pass .bin files with --bin, or "
                             "--ijb / --probes / --retrieval")
        confine_to_run(self.cfg, self.path)
        if r.num_pairs is not None and "eval_pairs" in self.cfg.data.kwargs:  # a source with held-out pairs of its own
            self.cfg.data.kwargs["eval_pairs"] = r.num_pairs
        sets = build_verification_sets(self.cfg)
        if not sets:
            raise ValueError(f"{self.path}: its config (data.name = {self.cfg.data.name!r}) has no verification "
                             "sets; pass .bin files with --bin, or --ijb / --probes / --retrieval")
        return [PairSet(name or "held-out", images, issame, fars=r.fars, flip=r.flip)
                for name, (images, issame) in sets.items()]

    def info(self) -> "ModelInfo":
        """What ``model.json`` says (or would say) of this model: its head, whether its norm is a quality."""
        from faceforge.deploy.modelfile import model_info_from_config

        if self.cfg is None:
            return self._info
        info = model_info_from_config(self.cfg)
        info.name = self.label
        return info


# --------------------------------------------------------------------------------------------------
# Features, cached
# --------------------------------------------------------------------------------------------------


class _ImageNames(Sequence[str]):
    """The images behind the rows of one feature part, named on demand (for a NaN embedding's message)."""

    def __init__(self, s: EvalSet, part: str, n: int) -> None:
        self.s, self.part, self.n = s, part, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):  # type: ignore[override]
        return self.s.image_name(self.part, int(index))


def _check_finite(features: dict[str, np.ndarray], s: EvalSet, ckpt: _Checkpoint) -> None:
    """NonFiniteEmbeddingError (exit 2) naming the model and the first image whose embedding is NaN or inf."""
    for part, x in features.items():
        if not np.isfinite(x).all():  # the cheap check first: a cache is a read-only memory map
            require_finite(np.array(x), str(ckpt.path), _ImageNames(s, part, len(x)))


def _features(s: EvalSet, data_key: str, ckpt: _Checkpoint, out: Path,
              batch_size: int) -> tuple[dict[str, np.ndarray], dict[str, Path], bool]:
    """``(features, paths, cached)``: the set's features for this checkpoint, from a cache in ``out`` that this
    installation wrote and signed (:func:`faceforge.core.fileio.is_signed`), or from the model."""
    stem = f"emb_{ckpt.key}_{_safe(s.features_name)}_{data_key}" + (f"_{s.embedding_tag}" if s.embedding_tag else "")
    paths = {part: out / (f"{stem}_{part}.npy" if part else f"{stem}.npy") for part in s.parts}
    if all(p.is_file() for p in paths.values()):
        if all(is_signed(p) for p in paths.values()):
            print(f"features: {ckpt.label} on {s.name}: cached {', '.join(str(p) for p in paths.values())}")
            features = {part: np.load(p, mmap_mode="r", allow_pickle=False) for part, p in paths.items()}
            _check_finite(features, s, ckpt)
            return features, paths, True
        print(f"features: {ckpt.label} on {s.name}: ignoring {', '.join(p.name for p in paths.values())} "
              "(not written by this installation)")
    print(f"features: {ckpt.label} on {s.name}: computing")
    features = s.embed(ckpt.model(), ckpt.image_size, batch_size=batch_size, progress=True)
    _check_finite(features, s, ckpt)
    for part, p in paths.items():
        save_npy(p, features[part])
        sign_file(p)
    return features, paths, False


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _record(ckpt: _Checkpoint, s: EvalSet, scores: SetScores, paths: dict[str, Path], cached: bool) -> dict:
    record = {"checkpoint": ckpt.label, "checkpoint_path": str(ckpt.path), "checkpoint_key": ckpt.key,
              "encoder": ckpt.encoder, "set": s.name, "kind": s.kind, "flip": s.flip}
    record.update(scores.record)
    if "model_threshold" in record:
        record["model_threshold_source"] = ckpt.threshold_source
    single = list(paths) == [""]
    record["embeddings"] = str(paths[""]) if single else {part: str(p) for part, p in paths.items()}
    record["cached"] = bool(cached)
    return record


FLIP_TITLE = "test-time flip"  # the notes key of a checkpoint whose config asks for another flip than this run


def _flip_note(ckpt: _Checkpoint, r: EvalRequest) -> str | None:
    """A note when the checkpoint's config evaluated (and chose its threshold) with another test-time flip than
    this request: the request wins, the note says so."""
    if ckpt.cfg is None or ckpt.cfg.eval.flip == r.flip:
        return None
    return (f"note: {ckpt.label}: its config has eval.flip = {str(ckpt.cfg.eval.flip).lower()} (its training-time "
            f"evaluations and model.json's threshold), this evaluation {'flips' if r.flip else 'does not flip'}"
            f"{' (pass --no-flip to match)' if r.flip else ''}")


def _pair_qualities(s: PairSet, data_key: str, ckpt: _Checkpoint, out: Path, r: EvalRequest,
                    scores: np.ndarray | None, notes: dict[str, list[str]]) -> tuple[str, np.ndarray]:
    """``(where the quality comes from, float64 (N,) per pair)``: the score file's (per image: the lower of a pair's
    two), or the model's embedding norms (cached like features; a note when its head does not train the norm as a
    quality)."""
    if scores is not None:
        return Path(str(r.quality)).name, scores if len(scores) == len(s.issame) else pair_quality(scores, r.quality)
    norms, _, _ = _features(ImageNorms(s), data_key, ckpt, out, r.batch_size)
    from faceforge.deploy.modelfile import quality_note

    note = quality_note(ckpt.info())
    if note and note not in notes.get(REJECT_TITLE, ()):
        print(f"note: {note}")
        notes.setdefault(REJECT_TITLE, []).append(note)
    return "embedding norm", pair_quality(np.asarray(norms[""])[:, 0], f"{ckpt.label} embedding norms")


def _tables(rows: list[tuple[str, dict[str, object]]], notes: dict[str, list[str]] | None = None) -> str:
    """One Markdown table per title, in first-seen order; columns are every row's keys, in order; each table
    followed by its footnote lines (``notes[title]``, e.g. why a cell shows "—")."""
    by_title: dict[str, list[dict[str, object]]] = {}
    for title, row in rows:
        by_title.setdefault(title, []).append(row)
    parts = []
    for title, table_rows in by_title.items():
        columns = list(dict.fromkeys(c for row in table_rows for c in row))
        lines = list(dict.fromkeys((notes or {}).get(title, ())))
        parts.append(f"## {title}\n\n{markdown_table(table_rows, columns)}" + "".join(f"\n{n}" for n in lines))
    return "\n\n".join(parts)


def _fpr_range(curves: list[PairCounts]) -> tuple[float, float]:
    """The ROC axis: down to the resolution of the largest set (1e-6 for IJB-C), at most 1e-4."""
    n_neg = max(c.n_neg for c in curves)
    return min(FPR_RANGE[0], max(1e-6, 10.0 ** math.floor(math.log10(1 / n_neg)))), FPR_RANGE[1]


def sets_label(r: EvalRequest) -> str:
    """A folder name for the sets of ``r``: their names (``held-out`` for a checkpoint's own) and a short hash
    of every option that changes a number, so that other sets (or other options) get another folder."""
    names = [Path(b).stem for b in r.bins] + ([r.ijb_name] if r.ijb else [])
    names += [f"{Path(r.probes).name}+{Path(r.distractors or '').name}"] if r.probes else []
    names += [Path(r.retrieval).name] if r.retrieval else []
    names = (names or ["held-out"] + ([f"{r.num_pairs}-pairs"] if r.num_pairs is not None else []))
    names += [flag for flag in TWINS if getattr(r, flag)] + ([] if r.flip else ["no-flip"])
    # options added later hash only when set, so that the folders of earlier requests keep their names
    options = {k: v for k, v in vars(r).items() if k != "batch_size" and (k not in _LATER_OPTIONS or v != _LATER_OPTIONS[k])}
    options.update(bins=[str(Path(b).resolve()) for b in r.bins],
                   **{k: str(Path(v).resolve()) for k in ("ijb", "probes", "distractors", "retrieval")
                      if (v := getattr(r, k))})
    digest = hashlib.blake2b(repr(sorted(options.items())).encode(), digest_size=4).hexdigest()
    return f"{_safe('+'.join(names))[:80]}-{digest}"


_LATER_OPTIONS = {"degraded": False, "flip": True, "quality": None}


def default_output(paths: Sequence[Path], request: EvalRequest | None = None) -> Path:
    """``eval/<name>/<sets>/`` beside the first checkpoint. ``<name>``: ``step_XXXXXXX`` (its training step) for
    one checkpoint (its file name when it holds no step, as model files do), ``compare_<a>_vs_<b>...`` for
    several; ``<sets>``: :func:`sets_label`, so that evaluating on other sets never replaces a report."""
    sets = sets_label(request or EvalRequest())
    if len(paths) > 1:
        return paths[0].parent / "eval" / _safe("compare_" + "_vs_".join(p.stem for p in paths))[:120] / sets
    step = None
    if paths[0].suffix.lower() not in MODEL_FILE_SUFFIXES:
        from faceforge.core.checkpoint import load_checkpoint

        step = load_checkpoint(paths[0]).get("step")
    name = f"step_{step:07d}" if isinstance(step, int) and not isinstance(step, bool) else _safe(paths[0].name)
    return paths[0].parent / "eval" / name / sets


def _unlinked(out: Path, run: Path) -> Path:
    """``out`` (a folder under ``run``) when no folder between them is a symlink: a run folder from someone else
    may ship ``eval -> ~/`` to make the reports land elsewhere. ValueError naming the link otherwise."""
    for folder in [out, *out.parents]:
        if folder == run:
            return out
        if folder.is_symlink():
            raise ValueError(f"{folder}: a symbolic link inside the run folder; faceforge writes its reports only "
                             "into real folders (remove it, or give --output)")
    return out


ROC_PLOT, REJECT_PLOT = "roc.png", "error_vs_reject.png"


def _quality_file(r: EvalRequest) -> np.ndarray | None:
    """The qualities of ``--quality FILE`` (a ``.npy`` of finite numbers, 1-D), read and checked before any work;
    None for the model's norm or no quality report."""
    if r.quality in (None, NORM_QUALITY):
        return None
    path = Path(r.quality)
    if path.suffix.lower() != ".npy":
        raise ValueError(f"--quality {r.quality}: expected {NORM_QUALITY!r} (the model's embedding norm) or a .npy "
                         "file of quality scores, one per image of the pair set (2N) or one per pair (N)")
    try:
        q = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"--quality {r.quality}: cannot read it as a .npy array: {e}") from None
    if q.ndim != 1 or not np.issubdtype(q.dtype, np.number) or np.iscomplexobj(q):
        raise ValueError(f"--quality {r.quality}: a {q.dtype} array of shape {q.shape}; expected 1-D real numbers")
    q = q.astype(np.float64)
    if not np.isfinite(q).all():
        bad = int(np.flatnonzero(~np.isfinite(q))[0])
        raise ValueError(f"--quality {r.quality}: value {bad} is {q[bad]}; expected finite quality scores")
    return q


def _check_quality(sets: list[EvalSet], r: EvalRequest, scores: np.ndarray | None) -> None:
    """``--quality`` needs a pair set; a score file scores exactly one (no masked / degraded copies) and has one value
    per image or per pair of it. ValueError naming the option, before any image is embedded."""
    if r.quality is None:
        return
    pairs = [s for s in sets if isinstance(s, PairSet)]
    if not pairs:
        raise ValueError("--quality reports error versus reject on 1:1 pairs: give --bin sets, or no set option to use "
                         "the checkpoint's held-out pairs (IJB, identification and retrieval have none)")
    if scores is None:
        return
    if len(pairs) != 1:
        raise ValueError(f"--quality {r.quality}: a score file scores the images of one pair set, there are "
                         f"{len(pairs)} ({', '.join(s.name for s in pairs)}); give one --bin, or --quality "
                         f"{NORM_QUALITY} (the model's norm)")
    n = len(pairs[0].issame)
    if len(scores) not in (n, 2 * n):
        raise ValueError(f"--quality {r.quality}: {len(scores)} values for {pairs[0].name} ({n} pairs, {2 * n} images); "
                         f"expected {2 * n} (one per image) or {n} (one per pair)")


def _reject_rows(label: str, s: PairSet, source: str, curves: list) -> list[tuple[str, dict[str, object]]]:
    """The error-versus-reject table's rows of one checkpoint and pair set: one per FMR."""
    rows = []
    for c in curves:
        cell = (lambda v: _pct(v)) if c.resolved else (lambda v: UNRESOLVED)
        row: dict[str, object] = {"model": f"{label} on {s.name}", "quality": source, "FMR": f"{c.fmr:.0e}",
                                  "threshold": f"{c.threshold:.4f}"}
        row.update({f"FNMR, {100 * f:.0f} % rejected": cell(v) for f, v in c.fnmr.items()})
        row["area (0-30 %)"] = f"{c.area:.5f}" if c.resolved else UNRESOLVED
        row["random rejection: FNMR / area"] = (f"{_pct(c.random_fnmr)} / {c.random_area:.5f}" if c.resolved
                                                else UNRESOLVED)
        rows.append((REJECT_TITLE, row))
    return rows


REJECT_TITLE = ("Error versus reject (FNMR at a threshold fixed on all pairs, after rejecting the lowest-quality "
                "genuine pairs; a pair's quality is the lower of its two images')")


def _remove_stale_plots(out: Path, written: set[Path]) -> None:
    """Remove the plots an earlier run listed in ``out/results.json`` that this run did not write again, so
    that a folder never shows a plot of sets its results.md does not hold (only ``roc.png``/``hist_*.png``
    inside ``out``; a link is removed, never followed)."""
    try:
        earlier = json.loads((out / "results.json").read_text()).get("plots", [])
    except (OSError, ValueError, AttributeError):
        return
    for name in earlier if isinstance(earlier, list) else []:
        p = out / Path(str(name)).name
        if p not in written and (p.name in (ROC_PLOT, REJECT_PLOT) or (p.name.startswith("hist_") and p.suffix == ".png")):
            p.unlink(missing_ok=True)


def evaluate_checkpoints(
    checkpoints: Sequence[str | Path],
    output: str | Path | None = None,
    request: EvalRequest | None = None,
    **options,
) -> dict[tuple[str, str], SetScores]:
    """Evaluate one or more `faceforge train` checkpoints on the sets of ``request`` (or ``options``:
    the fields of :class:`EvalRequest`), side by side; writes the reports listed in the module notes
    into ``output`` (default: a folder per checkpoint beside it, ``eval/step_XXXXXXX/`` after the training
    step it holds, so that evaluating two checkpoints of one run keeps both reports; when comparing,
    ``eval/compare_<a>_vs_<b>/`` beside the first).

    Pair sets also get the accuracy at the model's own threshold ("accuracy@model threshold"): the one its
    ``model.json`` carries, for every format of one model (SphereFace2's learned threshold, else the
    best-threshold accuracy's threshold on the run's first evaluation set; its source in ``results.json``).

    ``checkpoints``: ``last.pt`` files, run folders, ``model.safetensors`` or ``.onnx`` files.

    Returns:
        ``{(checkpoint label, set name): SetScores}``; labels are file names (made distinct if needed).
    """
    if not checkpoints:
        raise ValueError("no checkpoint given")
    r = request if request is not None else EvalRequest(**options)
    paths = [resolve_checkpoint(c) for c in checkpoints]
    out = Path(output) if output else _unlinked(default_output(paths, r), paths[0].parent)
    out.mkdir(parents=True, exist_ok=True)
    quality_scores = _quality_file(r)
    shared = [s for build in EVALUATIONS.values() for s in build(r)]
    shared = _with_twins(shared, r) if shared else shared
    if shared:
        _check_quality(shared, r, quality_scores)
    data_keys = {id(s): s.key() for s in shared}
    compare = len(paths) > 1

    results: dict[tuple[str, str], SetScores] = {}
    records, rows, hists, curves, notes, rejects = [], [], [], {}, {}, {}
    for path, label in zip(paths, _labels(paths)):
        label = label if r.encoder == "query" else f"{label}[{r.encoder}]"  # which encoder, in every table
        ckpt = _Checkpoint(path, label, r.encoder)
        sets = shared or _with_twins(ckpt.held_out_sets(r), r)
        if not shared:
            _check_quality(sets, r, quality_scores)
        flip_note = _flip_note(ckpt, r)
        if flip_note:
            print(flip_note)
            notes.setdefault(FLIP_TITLE, []).append(flip_note)
        for s in sets:
            data_key = data_keys.get(id(s)) or s.key()
            features, feature_paths, cached = _features(s, data_key, ckpt, out, r.batch_size)
            scores = s.score(features, threshold=ckpt.threshold)
            results[(label, s.name)] = scores
            records.append(_record(ckpt, s, scores, feature_paths, cached))
            rows += [(title, {"model": f"{label} on {s.name}"} | row) for title, row in scores.rows]
            for title, _ in scores.rows:
                notes.setdefault(title, []).extend(f"{n} ({label})" for n in scores.notes)
                if cached:
                    notes[title].append(f"{label} on {s.name}: features read from this installation's cache "
                                        f"({', '.join(p.name for p in feature_paths.values())}), not recomputed")
            if r.quality is not None and isinstance(s, PairSet):
                source, pair_q = _pair_qualities(s, data_key, ckpt, out, r, quality_scores, notes)
                reject = error_versus_reject(*scores.pairs, pair_q)
                records[-1]["error_versus_reject"] = {"quality": source, "by_fmr": [c.as_record() for c in reject]}
                rows += _reject_rows(label, s, source, reject)
                notes.setdefault(REJECT_TITLE, []).extend(
                    unresolved_note(c.fmr, c.negative_pairs, f"{label} on {s.name}", "FMR") for c in reject
                    if not c.resolved)
                rejects.update({f"{label} on {s.name}, FMR={c.fmr:.0e}": (c.fractions, c.curve, c.random_fnmr)
                                for c in reject if c.resolved})  # an unresolved FMR is "—" in the table
            if scores.pairs is None:
                continue
            name = f"{label} on {s.name}" + (" (sampled pairs)" if scores.sampled else "")
            curves[name] = scores.counts or PairCounts.of(*scores.pairs)
            stem = f"{_safe(label)}_{_safe(s.name)}" if compare else _safe(s.name)
            hists.append(score_histogram(*scores.pairs, out / f"hist_{stem}.png", title=f"{name}: pair scores"))

    title = " vs ".join(_labels(paths)) if compare else str(paths[0])
    roc_path = plot_roc({name: c.rates() for name, c in curves.items()}, out / ROC_PLOT, title=title,
                        fpr_range=_fpr_range(list(curves.values()))) if curves else None
    reject_path = plot_error_versus_reject(rejects, out / REJECT_PLOT, title=f"{title}: error versus reject") \
        if rejects else None
    twin_rows = [row for flag, twin in TWINS.items() if getattr(r, flag) for row in _twin_rows(results, twin)]
    flip_line = ("Test-time flip: on, embeddings f(x) + f(flip(x)) (--no-flip: f(x) only)" if r.flip
                 else "Test-time flip: off (--no-flip), embeddings f(x)")
    tables = flip_line + "\n\n" + _tables(rows + twin_rows, notes) + "".join(
        f"\n{n}" for n in dict.fromkeys(notes.get(FLIP_TITLE, ())))
    plots = [p for p in (roc_path, reject_path) if p is not None] + hists
    _remove_stale_plots(out, set(plots))
    write_text(out / "results.md", tables + "\n")
    write_text(out / "results.json", json.dumps(
        {"checkpoints": dict(zip(_labels(paths), map(str, paths))), "fars": [float(f) for f in r.fars],
         "flip": r.flip, "results": records, "plots": [p.name for p in plots]}, indent=2) + "\n")
    print(tables)
    print(f"results:    {out / 'results.md'}, {out / 'results.json'}")
    if roc_path is not None:
        print(f"ROC plot:   {roc_path}")
    if reject_path is not None:
        print(f"error versus reject: {reject_path}")
    print(f"histograms: {', '.join(str(h) for h in hists)}")
    return results


def evaluate_checkpoint(checkpoint: str | Path, output: str | Path | None = None, **options) -> dict[str, SetScores]:
    """:func:`evaluate_checkpoints` of one checkpoint: ``{set name: SetScores}`` (the held-out set of a
    synthetic config is named "held-out")."""
    results = evaluate_checkpoints([checkpoint], output=output, **options)
    return {name: scores for (_, name), scores in results.items()}
