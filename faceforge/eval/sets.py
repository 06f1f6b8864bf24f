"""Evaluation sets: one protocol on one dataset, split into *embed* (runs the model) and *score* (numbers).

Every set has a ``kind``, a ``name``, the ``parts`` its features come in, and:

- :meth:`EvalSet.key`: a short hash of what its features depend on (the data, not the model), so a
  cache of features can be keyed by (model, set name, key, part);
- :meth:`EvalSet.embed`: runs the model, ``{part: features}``;
- :meth:`EvalSet.score`: every number of the protocol from those features (:class:`SetScores`);
- :meth:`EvalSet.evaluate`: both, returning the flat numbers (what the trainer logs).

Every set embeds with the test-time flip, ``f(x) + f(flip(x))``, unless it is built with ``flip=False``
(``eval.flip: false`` in a training config, ``faceforge eval --no-flip``): then ``f(x)`` only.

``faceforge eval`` stores the features as ``.npy`` between the two steps, so re-scoring never runs the
model; the trainer calls :meth:`EvalSet.evaluate` every ``train.eval_every`` steps.

The sets (each in the papers' protocol, see the functions they call):

- :class:`PairSet`: insightface ``.bin`` pairs / held-out pairs, :func:`faceforge.eval.verify.evaluate_scores`;
- :class:`IJBSet`: IJB-B/C 1:1 and 1:N (:mod:`faceforge.eval.ijb`);
- :class:`DistractorSet`: MegaFace-style identification with distractors
  (:func:`faceforge.eval.identify.identify_with_distractors`);
- :class:`RetrievalSet`: Recall@K and mAP on a class-disjoint split (:mod:`faceforge.eval.retrieval`).

Image sets are an image folder (one sub-folder per identity; for distractors any image files under the
folder) or an insightface ``.rec``/``.idx`` pair (:func:`open_images`). Their images must already be
aligned to the model's input size; an image of another size is an error naming it.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from faceforge.data.source import open_source
from faceforge.eval import metrics
from faceforge.eval.identify import identify_with_distractors
from faceforge.eval.report import tar_cells
from faceforge.eval.retrieval import class_disjoint_split, retrieval_map, retrieval_recall
from faceforge.eval.verify import embed, embed_batches, embedding_norms, evaluate_scores, pair_scores

__all__ = [
    "DISTRACTOR_COUNTS",
    "IJB_FARS",
    "RETRIEVAL_KS",
    "VERIFICATION_FARS",
    "DistractorSet",
    "degraded_pair_set",
    "EvalSet",
    "IJBSet",
    "ImageNorms",
    "ImageSet",
    "PairSet",
    "RetrievalSet",
    "SetScores",
    "enrol_first",
    "open_images",
]

VERIFICATION_FARS = (1e-4, 1e-3, 1e-2, 1e-1)
IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
IJB_FPIRS = (1e-2, 1e-1)
IJB_RANKS = (1, 5, 10)
DISTRACTOR_COUNTS = (10, 100, 1_000, 10_000, 100_000, 1_000_000)  # MegaFace's curve
DISTRACTOR_FARS = (1e-6,)
# SOP / In-shop report Recall@1/10/100/1000 and Recall@1/10/20/30 (BroadFace Tables 4-5)
RETRIEVAL_KS = (1, 10, 20, 30, 100, 1000)
# the column of the accuracy at the model's own threshold (the one `faceforge verify` and model.json use)
MODEL_THRESHOLD_COLUMN = "accuracy@model threshold"
# The histogram / ROC of sets without a natural pair list use at most about this many sampled pairs
SAMPLED_PAIRS = 2_000_000


def _pct(x: float) -> str:
    return "" if x is None or not np.isfinite(x) else f"{100 * x:.2f} %"


def _hash(*items: object) -> str:
    """A short digest of ``items``: bytes and arrays by content (arrays read in place, as ``tobytes()`` would
    give them, without the copy), anything else by its ``repr``."""
    h = hashlib.blake2b(digest_size=4)
    for item in items:
        if isinstance(item, np.ndarray):
            item = np.ascontiguousarray(item).reshape(-1).view(np.uint8)
        h.update(item if isinstance(item, (bytes, np.ndarray)) else repr(item).encode())
    return h.hexdigest()


@dataclass
class SetScores:
    """What :meth:`EvalSet.score` returns.

    numbers: flat ``{name: float}``, every number (what the trainer logs, prefixed with the set name);
    names have no spaces, e.g. ``1:N-G1/rank-1``.
    record: the same numbers for ``results.json`` (nested where natural, e.g. ``tar_at_far``).
    rows: ``[(table title, {column: cell})]``, the row(s) this set adds to ``results.md``.
    pairs: ``(scores, labels)`` behind the score histogram and ROC; ``sampled`` when they are a sample
    (identification, retrieval) rather than the protocol's own pairs. counts: their
    :class:`~faceforge.eval.metrics.PairCounts` when already computed. result: the library's result.
    notes: footnote lines for the table (e.g. why a TAR@FAR cell shows "—").
    """

    numbers: dict[str, float]
    record: dict[str, Any]
    rows: list[tuple[str, dict[str, object]]]
    pairs: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    sampled: bool = False
    counts: metrics.PairCounts | None = field(default=None, repr=False)
    result: Any = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)


class EvalSet:
    """Base class; see the module notes. Subclasses set ``kind``, ``name`` and ``parts``."""

    kind: str = ""
    name: str = ""
    parts: tuple[str, ...] = ("",)
    flip: bool = True  # the test-time flip: features f(x) + f(flip(x)); False: f(x)

    @property
    def embedding_tag(self) -> str:
        """What, besides the data and the model, the features depend on, for a cache's file name: "" for the
        default (flip on), "noflip" without the flip."""
        return "" if self.flip else "noflip"

    @property
    def features_name(self) -> str:
        """The name a feature cache is filed under: ``name``, unless a set's name also says how it scores."""
        return self.name

    def key(self) -> str:
        """A short hash of the data the features depend on (not of the model)."""
        raise NotImplementedError

    def image_name(self, part: str, index: int) -> str:
        """The image behind row ``index`` of feature part ``part``, for messages (a NaN embedding names it)."""
        return f"{self.name}{f' {part}' if part else ''} image {index}"

    def embed(self, model: nn.Module, image_size: int, batch_size: int = 256,
              device: torch.device | str | None = None, progress: bool = False) -> dict[str, np.ndarray]:
        """Run ``model`` (``(B, 3, S, S) -> (B, D)``, ``S = image_size``) on the set's images, in eval mode:
        ``{part: float32 (N_part, D)}``."""
        raise NotImplementedError

    def score(self, features: dict[str, np.ndarray], threshold: float | None = None) -> SetScores:
        """Every number of the protocol from ``features`` (as :meth:`embed` returns them, or read back from
        a cache). ``threshold``: the model's own verification threshold (learned by its head, or chosen at
        training time; what ``model.json`` carries), whose accuracy pair sets also report."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, image_size: int, batch_size: int = 256,
                 device: torch.device | str | None = None) -> dict[str, float]:
        """Embed and score in one go: the flat numbers (what the trainer logs)."""
        return self.score(self.embed(model, image_size, batch_size, device)).numbers


# --------------------------------------------------------------------------------------------------
# Image sets: folders and .rec files
# --------------------------------------------------------------------------------------------------


class _ImageFiles:
    """Image files as a dataset ``ds[i] -> (uint8 (H, W, 3), -1)`` (unlabelled, e.g. distractors)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        from faceforge.data.folder import decode_image

        return decode_image(self.paths[index]), -1


def _stat_key(paths: Sequence[str]) -> str:
    """A hash of file names, sizes and modification times: changes when any file changes."""
    h = hashlib.blake2b(digest_size=4)
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass
class ImageSet:
    """Images (and their labels) read from a folder or a ``.rec``: see :func:`open_images`."""

    path: str
    dataset: Any
    labels: np.ndarray | None
    key: str

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self, index: int) -> str:
        return self.dataset.describe(index)  # folder and RecordIO datasets name the file / record

    def batches(self, indices: np.ndarray, size: int, batch_size: int, progress: bool = False,
                desc: str = "images") -> Iterator[np.ndarray]:
        """uint8 ``(B, size, size, 3)`` batches of the images ``indices``; another size is an error."""
        starts = range(0, len(indices), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, total=math.ceil(len(indices) / batch_size), desc=desc, unit="batch")
        for start in starts:
            batch = np.empty((min(batch_size, len(indices) - start), size, size, 3), dtype=np.uint8)
            for k, i in enumerate(indices[start : start + batch_size].tolist()):
                image = self.dataset[i][0]
                if image.shape != (size, size, 3):
                    raise ValueError(f"{self.describe(i)}: image is {image.shape[1]}x{image.shape[0]} but the "
                                     f"model takes {size}x{size} (its data.image_size); align the images first")
                batch[k] = image
            yield batch

    def embed(self, model: nn.Module, indices: np.ndarray, size: int, batch_size: int = 256,
              device: torch.device | str | None = None, progress: bool = False, desc: str = "images",
              flip: bool = True) -> np.ndarray:
        """``normalize(f(x) + f(flip(x)))`` (``flip``) or ``normalize(f(x))`` of the images ``indices``: float32
        ``(len(indices), D)``."""
        if len(indices) == 0:
            raise ValueError(f"{self.path}: no images to embed")
        return embed_batches(model, self.batches(indices, size, batch_size, progress, desc), flip=flip,
                             device=device, normalize=True)


def open_images(path: str | os.PathLike, labelled: bool = True) -> ImageSet:
    """An image folder or an insightface ``.rec`` as an :class:`ImageSet`.

    ``path``: a ``.rec``/``.idx`` prefix (or either file), or a folder. A labelled folder has one
    sub-folder per identity / class (:class:`faceforge.data.folder.ImageFolderDataset`); an unlabelled
    one (``labelled=False``, e.g. distractors) is every image file under it, sorted, and its labels are
    None. Errors name the path.
    """
    from faceforge.data.folder import IMAGE_EXTENSIONS, DatasetError, ImageFolderDataset
    from faceforge.data.recordio import RecordIODataset

    p = Path(path)
    found = open_source(p)  # the one rule for .rec / folder / .bin (faceforge.data.source)
    if found.format == "rec":
        prefix = found.path
        ds = RecordIODataset(prefix)
        labels = np.array([ds.label_of(i) for i in range(len(ds))], dtype=np.int64) if labelled else None
        return ImageSet(str(path), ds, labels, _stat_key([f"{prefix}.rec", f"{prefix}.idx"]))
    if found.format != "folder":
        raise FileNotFoundError(f"{path}: a .bin holds verification pairs; expected an image folder or a .rec/.idx pair")
    if labelled:
        ds = ImageFolderDataset(p)
        return ImageSet(str(path), ds, ds.labels, _stat_key([s for s, _ in ds.samples]))
    files = sorted(
        os.path.join(root, name)
        for root, dirs, names in os.walk(p)
        for name in names
        if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise DatasetError(f"{path}: no image files under this folder")
    return ImageSet(str(path), _ImageFiles(files), None, _stat_key(files))


def _as_image_set(source: str | os.PathLike | ImageSet, labelled: bool) -> ImageSet:
    return source if isinstance(source, ImageSet) else open_images(source, labelled=labelled)


# --------------------------------------------------------------------------------------------------
# Verification pairs (.bin, held-out)
# --------------------------------------------------------------------------------------------------


class PairSet(EvalSet):
    """1:1 verification of image pairs ``2k, 2k + 1`` (insightface ``.bin``), flip test-time augmentation
    (unless ``flip=False``).

    ``images`` uint8 ``(2N, H, W, 3)``, ``issame`` ``(N,)``. Numbers: 10-fold accuracy (insightface),
    best-threshold accuracy (OpenSphere), TAR@FAR at ``fars``, EER, AUC; with a ``threshold`` (a learned
    one, e.g. SphereFace2's) also the accuracy at it.
    """

    kind = "verification"

    def __init__(self, name: str, images: np.ndarray, issame: np.ndarray | Sequence[bool],
                 fars: Sequence[float] = VERIFICATION_FARS, source: str | None = None, flip: bool = True) -> None:
        self.name = name
        self.flip = bool(flip)
        self.source = source or f"set {name!r}"  # the file, for error messages
        self.images = images
        self.issame = np.asarray(issame, dtype=bool)
        self.fars = tuple(float(f) for f in fars)
        if len(images) != 2 * len(self.issame):
            raise ValueError(f"set {name!r}: {len(self.issame)} pairs but {len(images)} images")

    def key(self) -> str:
        return _hash(np.asarray(self.images), self.issame)

    def image_name(self, part: str, index: int) -> str:
        return f"{self.source} image {index} (pair {index // 2})"

    def check_size(self, image_size: int) -> None:
        """ValueError naming the file when its images are not ``image_size`` square."""
        h, w = self.images.shape[1:3]
        if (h, w) != (image_size, image_size):
            raise ValueError(f"{self.source}: images are {w}x{h} but the model takes {image_size}x{image_size} "
                             f"(its data.image_size); expected a .bin of {image_size}x{image_size} images")

    def embed(self, model, image_size, batch_size=256, device=None, progress=False):
        self.check_size(image_size)
        return {"": embed(model, self.images, batch_size=batch_size, flip=self.flip, device=device,
                          progress=progress)}

    def score(self, features, threshold=None):
        r = evaluate_scores(pair_scores(features[""]), self.issame, fars=self.fars, fixed_threshold=threshold)
        record = {
            "pairs": int(len(r.labels)),
            "positive_pairs": int(np.sum(r.labels)),
            "accuracy": r.accuracy,
            "accuracy_std": r.accuracy_std,
            "best_threshold_accuracy": r.best_threshold_accuracy,
            "threshold": r.threshold,
            "tar_at_far": {f"{far:.0e}": tar for far, tar in r.tar_at_far.items()},
            "eer": r.eer,
            "auc": r.auc,
        }
        row: dict[str, object] = {
            "10-fold accuracy": f"{100 * r.accuracy:.2f} ± {100 * r.accuracy_std:.2f} %",
            "best-threshold accuracy": f"{100 * r.best_threshold_accuracy:.2f} % @ {r.threshold:.3f}",
        }
        record["negative_pairs"] = r.negative_pairs
        if threshold is not None:
            record.update(model_threshold=r.fixed_threshold, accuracy_at_model_threshold=r.fixed_threshold_accuracy)
            row[MODEL_THRESHOLD_COLUMN] = f"{_pct(r.fixed_threshold_accuracy)} @ {r.fixed_threshold:.3f}"
        tars, notes = tar_cells(r.tar_at_far, r.negative_pairs, self.name or "held-out pairs", _pct)
        row.update(tars)
        row.update({"EER": _pct(r.eer), "AUC": f"{r.auc:.4f}"})
        return SetScores(r.as_dict(), record, [("Verification (.bin / held-out pairs)", row)],
                         pairs=(r.scores, r.labels), counts=r.counts, result=r, notes=notes)


DEGRADED_SUFFIX = " (degraded)"


def degraded_pair_set(s: PairSet) -> PairSet:
    """``s`` with the second image of every pair degraded (:func:`faceforge.data.degrade.degrade_images`: low
    resolution, then blur, at fixed levels; no random state), named ``"<name> (degraded)"`` (``"degraded"`` for the
    unnamed held-out set): a clean face against a low-quality one, the mixed-quality protocol of ``--degraded``."""
    from faceforge.data.degrade import degrade_images

    images = np.array(s.images, dtype=np.uint8, copy=True)
    images[1::2] = degrade_images(images[1::2])
    name = f"{s.name}{DEGRADED_SUFFIX}" if s.name else DEGRADED_SUFFIX.strip(" ()")
    return PairSet(name, images, s.issame, fars=s.fars, source=f"{s.source}{DEGRADED_SUFFIX}", flip=s.flip)


class ImageNorms(EvalSet):
    """The embedding norms of a pair set's images, ``|f(x)|`` of the model's raw output (no flip, before any
    normalisation): the magnitude MagFace reads as a quality score. Features: ``{"": float64 (2N, 1)}``; cached like
    any set's features (under ``"<set>-norms"``); it scores nothing itself (``faceforge.eval.quality`` does)."""

    kind = "norms"

    def __init__(self, pairs: PairSet) -> None:
        self.pairs = pairs
        self.name = pairs.name

    @property
    def embedding_tag(self) -> str:
        return "norms"

    def key(self) -> str:
        return self.pairs.key()

    def image_name(self, part: str, index: int) -> str:
        return self.pairs.image_name(part, index)

    def embed(self, model, image_size, batch_size=256, device=None, progress=False):
        self.pairs.check_size(image_size)
        return {"": embedding_norms(model, self.pairs.images, batch_size=batch_size, device=device)[:, None]}


# --------------------------------------------------------------------------------------------------
# IJB-B / IJB-C
# --------------------------------------------------------------------------------------------------


class IJBSet(EvalSet):
    """An IJB-B / IJB-C release: 1:1 TAR@FAR on its template pairs and, when its 1:N files are there,
    TPIR@FPIR and rank-k of the mixed probes against each gallery (G1/G2, or S1/S2 for IJB-B).

    ``root``: the release folder (``meta/``, ``loose_crop/``; :mod:`faceforge.data.ijb`); ``name``:
    ``IJBB`` or ``IJBC``. 1:N uses ``meta/<name>_1N_probe_mixed.csv`` and every
    ``meta/<name>_1N_gallery_*.csv``. Features: image + flip, summed, not normalised (insightface),
    optionally weighted by faceness (``faceness=True``) when forming templates.

    ``protocol`` (``faceforge.eval.metrics.IJB_PROTOCOLS``): "faceforge" (default: TAR the largest with
    ``FPR <= FAR``, ``floor(FPIR N)`` false alarms) or "insightface" (its reference code's choices: the ROC
    point nearest the FAR, one false alarm fewer, and faceness weighting unless ``faceness=False``). Every
    table row names the protocol. A gallery naming templates the meta file lacks costs that gallery's 1:N
    numbers only (its row and record say why); the 1:1 numbers are kept.
    """

    kind = "ijb"

    def __init__(self, root: str | os.PathLike, name: str = "IJBC", faceness: bool | None = None,
                 fars: Sequence[float] = IJB_FARS, fpirs: Sequence[float] = IJB_FPIRS,
                 ranks: Sequence[int] = IJB_RANKS, protocol: str = "faceforge", flip: bool = True) -> None:
        from faceforge.eval.metrics import IJB_PROTOCOLS

        from faceforge.data.ijb import IJBMeta, meta_paths
        from faceforge.eval.ijb import read_1n_gallery, read_1n_probes

        if protocol not in IJB_PROTOCOLS:
            raise ValueError(f"protocol {protocol!r}: expected one of {', '.join(IJB_PROTOCOLS)}")
        self.protocol, self.flip = protocol, bool(flip)
        faceness = (protocol == "insightface") if faceness is None else faceness
        self.root = Path(root)
        self.meta = IJBMeta.load(root, name)
        self.name = self.meta.name + ("-faceness" if faceness else "") + ("" if protocol == "faceforge" else f"-{protocol}")
        self.faceness = faceness
        self.fars, self.fpirs, self.ranks = tuple(fars), tuple(fpirs), tuple(ranks)
        self._meta_files = [str(p) for p in meta_paths(root, name).values()]
        prefix = self.meta.name.lower()
        probes = self.root / "meta" / f"{prefix}_1N_probe_mixed.csv"
        gallery_files = sorted((self.root / "meta").glob(f"{prefix}_1N_gallery_*.csv"))
        self.probes = read_1n_probes(probes) if probes.is_file() and gallery_files else None
        self.galleries = {
            g.stem.rsplit("_", 1)[-1]: read_1n_gallery(g) for g in gallery_files
        } if self.probes is not None else {}
        self.gallery_files = {g.stem.rsplit("_", 1)[-1]: str(g) for g in gallery_files}
        self.probe_file = str(probes)

    @property
    def features_name(self) -> str:  # the faceness weighting applies to templates, not to image features
        return self.meta.name

    def key(self) -> str:  # features do not depend on the faceness weighting (applied to templates)
        return _hash(_stat_key(self._meta_files), len(self.meta))

    def embed(self, model, image_size, batch_size=128, device=None, progress=False):
        from faceforge.eval.ijb import ijb_embeddings

        return {"": ijb_embeddings(model, self.meta, self.root, batch_size=batch_size, flip=self.flip,
                                   progress=progress, size=image_size, device=device)}

    def score(self, features, threshold=None):
        from faceforge.eval.ijb import ijb_identification, ijb_templates, ijb_verification

        template_feats = ijb_templates(features[""], self.meta, self.faceness)  # once, for 1:1 and every gallery
        v = ijb_verification(features[""], self.meta, fars=self.fars, templates=template_feats, protocol=self.protocol)
        numbers = {f"1:1/tar@far={far:.0e}": tar for far, tar in v["tar_at_far"].items()}
        numbers["1:1/auc"] = v["auc"]
        record: dict[str, Any] = {
            "template_pairs": int(len(v["labels"])),
            "protocol": self.protocol,
            "faceness_weight": self.faceness,
            "verification": {"tar_at_far": {f"{f:.0e}": t for f, t in v["tar_at_far"].items()}, "auc": v["auc"]},
            "identification": {},
        }
        negatives = int(np.count_nonzero(~np.asarray(v["labels"], dtype=bool)))
        record["verification"]["negative_pairs"] = negatives
        tars, notes = tar_cells(v["tar_at_far"], negatives, f"{self.name} 1:1", _pct)
        row = {"protocol": self.protocol} | tars | {"AUC": f"{v['auc']:.4f}"}
        rows = [("IJB 1:1 verification (TAR@FAR)", row)]
        for gallery, members in self.galleries.items():
            try:
                r = ijb_identification(features[""], self.meta, members, self.probes, fpirs=self.fpirs,
                                       ranks=self.ranks, templates=template_feats, protocol=self.protocol,
                                       gallery_name=self.gallery_files[gallery], probes_name=self.probe_file)
            except ValueError as e:  # this gallery's 1:N only: the 1:1 numbers and the other galleries stay
                record["identification"][gallery] = {"error": str(e)}
                rows.append(("IJB 1:N identification (mixed probes)",
                             {"gallery": gallery, "protocol": self.protocol, "error": str(e)}))
                print(f"faceforge eval: {self.name} 1:N {gallery}: {e}", file=sys.stderr)
                continue
            numbers.update({f"1:N-{gallery}/tpir@fpir={f:.0e}": t for f, t in r["tpir_at_fpir"].items()})
            numbers.update({f"1:N-{gallery}/rank-{k}": rate for k, rate in r["rank"].items()})
            record["identification"][gallery] = {
                "tpir_at_fpir": {f"{f:.0e}": t for f, t in r["tpir_at_fpir"].items()},
                "rank": {str(k): rate for k, rate in r["rank"].items()},
                "mated_probes": r["mated"], "non_mated_probes": r["non_mated"],
            }
            rows.append(("IJB 1:N identification (mixed probes)",
                         {"gallery": gallery, "protocol": self.protocol}
                         | {f"TPIR@FPIR={f:.0e}": _pct(t) for f, t in r["tpir_at_fpir"].items()}
                         | {f"rank-{k}": _pct(rate) for k, rate in r["rank"].items()}))
        return SetScores(numbers, record, rows, pairs=(v["scores"], v["labels"]), counts=v["counts"], result=v,
                         notes=notes)


# --------------------------------------------------------------------------------------------------
# Identification with distractors (MegaFace style)
# --------------------------------------------------------------------------------------------------


def enrol_first(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(gallery, probes)`` indices: each identity's first image is enrolled, its others are probes.

    An identity with one image is enrolled only (a non-mated gallery entry for every other probe).
    Raises ValueError when no identity has two images (nothing to search for).
    """
    labels = np.asarray(labels)
    _, first = np.unique(labels, return_index=True)
    probes = np.setdiff1d(np.arange(len(labels)), first)
    if len(probes) == 0:
        raise ValueError("identification needs an identity with at least 2 images (one enrolled, one probe); "
                         f"every one of the {len(first)} identities has a single image")
    return np.sort(first), probes


def _count_name(n: int) -> str:
    for div, suffix in ((1_000_000, "M"), (1_000, "K")):
        if n >= div and n % div == 0:
            return f"{n // div}{suffix}"
    return str(n)


class DistractorSet(EvalSet):
    """Identification of probes among distractors, MegaFace challenge 1 style.

    ``probes``: a labelled image set (folder of identities or ``.rec``); each identity's first image is
    enrolled in the gallery and its other images are probes (:func:`enrol_first`). ``distractors``: an
    image set of other people. For each count ``n`` of ``counts`` below the number of distractors (and
    for all of them), the first ``n`` distractors join the gallery: rank-k identification rates
    (``ks``) and TAR@FAR (``fars``, probe-mate pairs against every probe-non-mate pair) by
    :func:`~faceforge.eval.identify.identify_with_distractors`, streamed in blocks.

    MegaFace itself searches every probe image against every other image of its identity in turn; here
    each identity has one enrolled image, the usual closed-set gallery.
    """

    kind = "identification"
    parts = ("probes", "distractors")

    def __init__(self, probes: str | os.PathLike | ImageSet, distractors: str | os.PathLike | ImageSet,
                 counts: Sequence[int] = DISTRACTOR_COUNTS, ks: Sequence[int] = (1, 5, 10),
                 fars: Sequence[float] = DISTRACTOR_FARS, name: str | None = None, flip: bool = True) -> None:
        self.flip = bool(flip)
        self.probe_set = _as_image_set(probes, labelled=True)
        self.distractor_set = _as_image_set(distractors, labelled=False)
        self.gallery_idx, self.probe_idx = enrol_first(self.probe_set.labels)
        self.name = name or f"{Path(self.probe_set.path).name}+{Path(self.distractor_set.path).name}"
        m = len(self.distractor_set)
        self.counts = sorted({int(c) for c in counts if 0 < int(c) < m} | {m})
        self.ks, self.fars = tuple(int(k) for k in ks), tuple(float(f) for f in fars)

    def key(self) -> str:
        return _hash(self.probe_set.key, self.distractor_set.key)

    def image_name(self, part: str, index: int) -> str:
        return (self.probe_set if part == "probes" else self.distractor_set).describe(index)

    def embed(self, model, image_size, batch_size=256, device=None, progress=False):
        everything = np.arange(len(self.probe_set))
        return {
            "probes": self.probe_set.embed(model, everything, image_size, batch_size, device, progress, "probes",
                                           self.flip),
            "distractors": self.distractor_set.embed(model, np.arange(len(self.distractor_set)), image_size,
                                                     batch_size, device, progress, "distractors", self.flip),
        }

    def score(self, features, threshold=None):
        feats, labels = features["probes"], self.probe_set.labels
        probe, gallery = feats[self.probe_idx], feats[self.gallery_idx]
        p_lab, g_lab = labels[self.probe_idx], labels[self.gallery_idx]
        numbers: dict[str, float] = {}
        per_count: dict[str, Any] = {}
        row: dict[str, object] = {}
        for n in self.counts:  # MegaFace's curve: the first n distractors, n = 10 .. all
            r = identify_with_distractors(probe, p_lab, gallery, g_lab, features["distractors"], ks=self.ks,
                                          fars=self.fars, num_distractors=n)
            numbers.update({f"d={n}/rank-{k}": rate for k, rate in r.rank_k.items()})
            numbers.update({f"d={n}/tar@far={f:.0e}": t for f, t in r.tar_at_far.items()})
            per_count[str(n)] = {"rank": {str(k): v for k, v in r.rank_k.items()},
                                 "tar_at_far": {f"{f:.0e}": t for f, t in r.tar_at_far.items()},
                                 "negative_pairs": r.num_negative_pairs}
            row[f"rank-1 @{_count_name(n)}"] = _pct(r.rank_k.get(1, float("nan")))
        n = self.counts[-1]  # every distractor: the other ranks and the TAR
        row.update({f"rank-{k} @{_count_name(n)}": _pct(v) for k, v in r.rank_k.items() if k != 1})
        tars, notes = tar_cells(r.tar_at_far, r.num_negative_pairs, f"{self.name} with {_count_name(n)}", _pct,
                                suffix=f" @{_count_name(n)}")
        row.update(tars)
        record = {"probes": int(len(self.probe_idx)), "gallery": int(len(self.gallery_idx)),
                  "distractors": int(len(features["distractors"])), "by_distractors": per_count}
        return SetScores(numbers, record, [("Identification with distractors (MegaFace style)", row)],
                         pairs=self._sample_pairs(probe, p_lab, gallery, g_lab, features["distractors"]),
                         sampled=True, result=r, notes=notes)

    @staticmethod
    def _sample_pairs(probe, p_lab, gallery, g_lab, distractors) -> tuple[np.ndarray, np.ndarray]:
        """Each probe with its enrolled mate (positive) and with the first distractors (negatives)."""
        mate = (g_lab[None, :] == p_lab[:, None]).argmax(axis=1)
        pos = np.einsum("pd,pd->p", probe, gallery[mate]).astype(np.float64)
        m = min(len(distractors), max(1, SAMPLED_PAIRS // len(probe)))
        neg = (probe @ np.asarray(distractors[:m]).T).ravel().astype(np.float64)
        return np.concatenate((pos, neg)), np.concatenate((np.ones(len(pos), bool), np.zeros(len(neg), bool)))


# --------------------------------------------------------------------------------------------------
# Retrieval (SOP / In-shop style)
# --------------------------------------------------------------------------------------------------


class RetrievalSet(EvalSet):
    """Retrieval on a labelled image set: every item queries all others by cosine similarity.

    Numbers: Recall@K for ``ks`` (default 1, 10, 20, 30, 100, 1000: SOP's and In-shop's columns; a K
    above ``N - 1`` is clipped) and mAP. ``test_fraction``: evaluate only a class-disjoint test split
    of this fraction of the classes (:func:`~faceforge.eval.retrieval.class_disjoint_split`, ``seed``);
    None: the whole set is the test split (e.g. SOP's own test classes).
    """

    kind = "retrieval"

    def __init__(self, source: str | os.PathLike | ImageSet, test_fraction: float | None = None, seed: int = 0,
                 ks: Sequence[int] = RETRIEVAL_KS, name: str | None = None, flip: bool = True) -> None:
        self.flip = bool(flip)
        self.images = _as_image_set(source, labelled=True)
        self.test_fraction, self.seed = test_fraction, seed
        everything = np.arange(len(self.images))
        self.indices = everything if test_fraction is None else class_disjoint_split(
            self.images.labels, test_fraction, seed)[1]
        self.ks = tuple(int(k) for k in ks)
        self.name = name or Path(self.images.path).name

    def key(self) -> str:
        return _hash(self.images.key, self.indices)

    def image_name(self, part: str, index: int) -> str:
        return self.images.describe(int(self.indices[index]))

    def embed(self, model, image_size, batch_size=256, device=None, progress=False):
        return {"": self.images.embed(model, self.indices, image_size, batch_size, device, progress, self.name,
                                      self.flip)}

    def score(self, features, threshold=None):
        x, y = features[""], self.images.labels[self.indices]
        recall = retrieval_recall(x, y, ks=self.ks)
        mean_ap = retrieval_map(x, y)
        numbers = {f"recall@{k}": r for k, r in recall.items()} | {"map": mean_ap}
        record = {"items": int(len(y)), "classes": int(len(np.unique(y))), "test_fraction": self.test_fraction,
                  "recall": {str(k): r for k, r in recall.items()}, "map": mean_ap}
        row = {f"R@{k}": _pct(r) for k, r in recall.items()} | {"mAP": _pct(mean_ap)}
        return SetScores(numbers, record, [("Retrieval (class-disjoint)", row)], pairs=self._sample_pairs(x, y),
                         sampled=True, result=recall)

    def _sample_pairs(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Pairs of a random subset of queries (seeded) with every other item."""
        n = len(y)
        q = np.random.default_rng(self.seed).permutation(n)[: max(1, min(n, SAMPLED_PAIRS // n))]
        xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = xn[q] @ xn.T
        same = y[q, None] == y[None, :]
        other = np.ones_like(same)
        other[np.arange(len(q)), q] = False  # not the query itself
        scores, labels = sim[other].astype(np.float64), same[other]
        return (scores, labels) if 0 < labels.sum() < len(labels) else None
