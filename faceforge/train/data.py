"""Training and verification data named by ``data.name``: the built-in synthetic identities, insightface
RecordIO, an image folder, or rendered font glyphs; and label noise over any of them (``data.label_noise``).

``DATASETS`` (a ``faceforge.registry.Registry``) maps ``data.name`` to the training set's builder
``(cfg) -> Dataset``, and ``VERIFICATION_SETS`` the same name to the held-out verification sets' builder
``(cfg) -> {name: (images uint8 (2N, H, W, 3), issame (N,))}`` (a name without one has no held-out sets;
``data.name`` may be ``"package.module:callable"``, a training set builder). A training set has
``num_classes`` and ``ds[i] -> ((3, H, W) float tensor normalised (x - 127.5) / 127.5, label)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from faceforge.fileio import append_text
from faceforge.registry import Registry
from faceforge.train import distributed as fdist
from faceforge.train.checkpoint import CHECKPOINT_NAME
from faceforge.train.config import Config, ConfigError

__all__ = [
    "BadRecordError", "DATASETS", "VERIFICATION_SETS", "LABEL_MAP_NAME", "LabelNoise", "build_dataset", "build_evaluators", "build_verification_sets",
    "build_unlabelled", "dataset_labels", "glyph_benchmark_of", "shuffled_labels", "synthetic_held_out_pairs",
]

def _synthetic_train(cfg: Config) -> Dataset:
    from faceforge.data.synthetic import SyntheticFaces

    d = cfg.data
    return SyntheticFaces(
        d.num_identities, d.images_per_identity, split="train", seed=cfg.seed,
        difficulty=d.difficulty, image_size=d.image_size, cache=d.cache,
    )


def synthetic_held_out_pairs(cfg: Config) -> tuple[Any, Any]:
    """``data.eval_pairs`` pairs of ``data.eval_identities`` test-split (never trained) synthetic identities."""
    from faceforge.data.synthetic import synthetic_pairs

    d = cfg.data
    return synthetic_pairs(
        d.eval_pairs, num_identities=d.eval_identities, seed=cfg.seed,
        difficulty=d.difficulty, image_size=d.image_size, split="test",
    )


def _synthetic_eval(cfg: Config) -> dict[str, tuple[Any, Any]]:
    """``{"": (images, issame)}`` (metric names unprefixed), or ``{}`` when ``data.eval_pairs`` is 0."""
    return {"": synthetic_held_out_pairs(cfg)} if cfg.data.eval_pairs > 0 else {}


class _DatasetView(Dataset):
    """A dataset seen through a wrapper: length, ``num_classes`` and ``describe`` are the wrapped one's."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    @property
    def num_classes(self) -> int:
        return int(self.dataset.num_classes)

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self, index: int) -> str:
        """Item ``index`` for error messages: the wrapped dataset's own words (file, record), else ``image i``."""
        describe = getattr(self.dataset, "describe", None)
        return describe(index) if describe is not None else f"image {index}"


class _TrainImages(_DatasetView):
    """A decoded-image dataset (``ds[i] -> (uint8 HWC, label)``) as training tensors.

    ``ds[i] -> ((3, S, S) float32 normalised (x - 127.5) / 127.5, label)``; an image that is not
    ``image_size`` square raises ValueError naming the file / record (nothing is resized).

    ``bad_records``: None (default) = an unreadable record raises :class:`BadRecordError` naming it (file,
    key, byte offset); a path (``data.skip_bad``) = it is appended there, one line each, and the next readable
    index takes its place (so batches keep their size and a resumed run reads the same images).
    """

    MAX_SKIPPED_IN_A_ROW = 64

    def __init__(self, dataset: Any, image_size: int, bad_records: Path | None = None) -> None:
        super().__init__(dataset)
        self.image_size = image_size
        self.bad_records = bad_records
        self._reported: set[int] = set()

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        from faceforge.data.transforms import to_tensor

        image, label = self.dataset[index]
        s = self.image_size
        if image.shape != (s, s, 3):
            raise ValueError(
                f"{self.describe(index)}: image is {image.shape[1]}x{image.shape[0]} but data.image_size is {s}; "
                f"images are not resized (align/crop them to {s}x{s} first)"
            )
        return to_tensor(image), int(label)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(self.MAX_SKIPPED_IN_A_ROW):
            i = (index + attempt) % len(self)
            try:
                return self._load(i)
            except (ValueError, OSError) as e:
                message = " ".join(str(e).split())
                if self.bad_records is None:
                    raise BadRecordError(f"data.path: {message}; expected a readable image (data.skip_bad: true "
                                         f"skips such records)") from e
                if i not in self._reported:  # one line per record and process (workers append too)
                    self._reported.add(i)
                    append_text(self.bad_records, f"{message}\n")
        raise BadRecordError(f"data.path: {self.MAX_SKIPPED_IN_A_ROW} unreadable records in a row from "
                             f"{self.describe(index)} (data.skip_bad); expected mostly readable data")


class BadRecordError(ValueError):
    """A training record that cannot be read or decoded (the message names file, key and offset)."""


def _bad_records_path(cfg: Config) -> Path | None:
    """``output/bad_records.txt`` with ``data.skip_bad``, else None (an unreadable record stops the run)."""
    from faceforge.train.lifecycle import BAD_RECORDS_NAME

    return Path(cfg.output) / BAD_RECORDS_NAME if cfg.data.skip_bad else None


def _require_path(cfg: Config, what: str) -> str:
    if not cfg.data.path:
        raise ConfigError(f"data.path is required for data.name = {cfg.data.name!r} ({what}); it is {cfg.data.path!r}")
    return cfg.data.path


def _recordio_train(cfg: Config) -> Dataset:
    from faceforge.data.recordio import RecordIODataset

    prefix = _require_path(cfg, "the prefix of the .rec/.idx files")
    # an image of more than 4 crops of pixels is refused from its header (a bomb is never decoded); smaller
    # ones of the wrong size are named by _TrainImages
    dataset = RecordIODataset(prefix=prefix, max_pixels=4 * cfg.data.image_size**2)
    _check_record_headers(dataset, skip_bad=cfg.data.skip_bad)
    return _TrainImages(dataset, cfg.data.image_size, _bad_records_path(cfg))


def _check_record_headers(dataset: Any, skip_bad: bool) -> None:
    """Every record's framing and label, before step 1 (``RecordIODataset.check_records``): a corrupt
    record stops here naming it, unless ``data.skip_bad`` (then it is skipped, and listed, when read).
    An image whose bytes do not decode is found when it is read."""
    from faceforge.data.recordio import RecordIOError

    try:
        dataset.check_records(on_bad=(lambda message: None) if skip_bad else None)
    except RecordIOError as e:
        raise BadRecordError(f"data.path: {' '.join(str(e).split())}; expected a readable record (data.skip_bad: "
                             "true skips such records)") from None


LABEL_MAP_NAME = "label_map.json"


def _folder_train(cfg: Config) -> Dataset:
    """The image folder; its ``{folder: label}`` map is kept in ``output/label_map.json``.

    When the output folder already holds a checkpoint and a label map, the map is reused, so that a
    resumed run gives every identity the head row it had; otherwise labels follow the sorted folder
    names and the map is (re)written.
    """
    from faceforge.data.folder import ImageFolderDataset

    root = _require_path(cfg, "a folder with one sub-folder per identity")
    label_map = Path(cfg.output) / LABEL_MAP_NAME
    reuse = label_map.is_file() and (Path(cfg.output) / CHECKPOINT_NAME).is_file()
    dataset = ImageFolderDataset(root, class_to_label=label_map if reuse else None)
    if not reuse and fdist.get_rank() == 0:
        dataset.save_label_map(label_map)
    return _TrainImages(dataset, cfg.data.image_size, _bad_records_path(cfg))


def _bin_eval(cfg: Config) -> dict[str, tuple[Any, Any]]:
    """``{name: (images, issame)}`` for every ``data.eval_bins`` file (name = file stem, made unique)."""
    from faceforge.data.pairs import load_bins

    s = cfg.data.image_size
    sets = load_bins(cfg.data.eval_bins, expect_size=s, expect_name="data.image_size")  # headers checked first
    for path, (images, _) in zip(cfg.data.eval_bins, sets.values()):
        if images.shape[1:3] != (s, s):
            raise ValueError(
                f"{path}: verification images are {images.shape[2]}x{images.shape[1]} but data.image_size is {s}"
            )
    return sets


def glyph_benchmark_of(cfg: Config) -> Any:
    """The glyph benchmark of ``cfg`` (``faceforge.data.glyphs.glyph_benchmark``, memoised per process: the
    training set and its pairs render once)."""
    from faceforge.data.glyphs import CHARSETS, DEFAULT_FONT_DIR, glyph_benchmark

    d = cfg.data
    if d.glyph_charset not in CHARSETS:
        raise ConfigError(f"data.glyph_charset = {d.glyph_charset!r}: expected one of {sorted(CHARSETS)}")
    return glyph_benchmark(
        d.path or DEFAULT_FONT_DIR, d.glyph_charset, d.num_identities, d.eval_identities,
        d.glyph_held_out_families, cfg.seed, d.image_size, d.glyph_variants, d.glyph_min_coverage,
    )


def _glyph_train(cfg: Config) -> Dataset:
    return glyph_benchmark_of(cfg).train_set()


def _glyph_eval(cfg: Config) -> dict[str, tuple[Any, Any]]:
    """``data.eval_pairs`` pairs of the test characters (``{}`` when it is 0)."""
    return {"": glyph_benchmark_of(cfg).pairs(cfg.data.eval_pairs)} if cfg.data.eval_pairs > 0 else {}


# data.name -> the training set builder (cfg) -> Dataset with ``num_classes`` and ``ds[i] -> ((3, H, W) float
# tensor, label)``; and the held-out verification sets builder (cfg) -> ``{name: (images uint8 (2N, H, W, 3),
# issame (N,))}`` (``{}`` = no verification; metric names are prefixed ``name/`` unless name is "").
DATASETS: Registry[Dataset] = Registry("dataset")
VERIFICATION_SETS: Registry[dict[str, tuple[Any, Any]]] = Registry("verification set")
for _name, _train, _eval in (
    ("synthetic", _synthetic_train, _synthetic_eval),
    ("recordio", _recordio_train, None),
    ("folder", _folder_train, None),
    ("glyphs", _glyph_train, _glyph_eval),
):
    DATASETS.register(_name)(_train)
    if _eval is not None:
        VERIFICATION_SETS.register(_name)(_eval)


def _check_name(cfg: Config) -> None:
    if not DATASETS.is_known(cfg.data.name):
        raise ValueError(f"data.name = {cfg.data.name!r}: expected {DATASETS.expected()}")


def build_verification_sets(cfg: Config) -> dict[str, tuple[Any, Any]]:
    """The held-out verification sets of ``cfg``: ``{name: (images uint8 (2N, H, W, 3), issame (N,))}``.

    Synthetic data: one set named "" of ``data.eval_pairs`` pairs of test-split identities; glyphs: one set
    named "" of pairs of test characters; recordio and folder: none of their own. Then, for any
    ``data.name``, the ``data.eval_bins``, named after their files. Empty when there are none. Label noise
    never touches these.
    """
    _check_name(cfg)
    sets = VERIFICATION_SETS.build(cfg.data.name, cfg=cfg) if cfg.data.name in VERIFICATION_SETS else {}
    if cfg.data.eval_bins:
        sets.update(_bin_eval(cfg))
    return sets


def dataset_labels(dataset: Any) -> np.ndarray:
    """int64 ``(N,)`` label of every item: the dataset's ``labels`` (or its wrapped ``dataset``'s), RecordIO
    record headers (no image decoded), or, failing both, ``dataset[i][1]`` for every item."""
    inner = getattr(dataset, "dataset", dataset)  # _TrainImages wraps the decoded-image dataset
    for candidate in (dataset, inner):
        labels = getattr(candidate, "labels", None)
        if labels is not None:
            return np.asarray(labels, dtype=np.int64)
    label_of = getattr(inner, "label_of", None)
    if label_of is not None:
        return np.array([label_of(i) for i in range(len(inner))], dtype=np.int64)
    return np.array([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


_TAG_LABEL_NOISE = 0x401


def shuffled_labels(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Label noise as in SphereFace2 Sec. 4.3 ("randomly shuffle 20 % ... of the labels for each class").

    ``round(fraction * n_c)`` items of every class ``c`` are chosen at random and their labels are permuted
    among all chosen items (so a label may move to another class, or by chance stay). Deterministic in
    ``(labels, fraction, seed)``.

    Returns:
        ``(noisy labels int64 (N,), chosen item indices int64 (M,), sorted)``.
    """
    y = np.asarray(labels, dtype=np.int64)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label noise fraction must lie in [0, 1], got {fraction!r}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _TAG_LABEL_NOISE]))
    order = np.lexsort((rng.random(len(y)), y))  # by class, random within a class
    _, starts, counts = np.unique(y[order], return_index=True, return_counts=True)
    rank = np.arange(len(y)) - np.repeat(starts, counts)  # position inside the class block
    take = np.floor(fraction * counts + 0.5).astype(np.int64)
    chosen = np.sort(order[rank < np.repeat(take, counts)])
    noisy = y.copy()
    noisy[chosen] = y[chosen][rng.permutation(len(chosen))]
    return noisy, chosen


class LabelNoise(_DatasetView):
    """A training set whose labels are :func:`shuffled_labels` of the wrapped one's; images unchanged.

    ``labels`` are the noisy labels, ``clean_labels`` the originals, ``noisy_indices`` the items chosen.
    """

    def __init__(self, dataset: Any, fraction: float, seed: int) -> None:
        super().__init__(dataset)
        self.clean_labels = dataset_labels(dataset)
        self.labels, self.noisy_indices = shuffled_labels(self.clean_labels, fraction, seed)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, _ = self.dataset[index]
        return image, int(self.labels[index])


def build_evaluators(cfg: Config) -> list[Any]:
    """Every evaluation set of ``cfg`` (``faceforge.eval.sets.EvalSet``), built once, run every eval step.

    The held-out verification sets (:func:`build_verification_sets`, TAR@FAR 1e-3 and 1e-4), then
    ``data.eval_ijb`` (named after the release), ``data.eval_probes`` among ``data.eval_distractors``
    ("identification") and ``data.eval_retrieval`` ("retrieval") when set. Errors name the config key and the file (:func:`faceforge.train.preflight.open_evaluators`, which the
    trainer calls before its first step).
    """
    from faceforge.train.preflight import open_evaluators

    return open_evaluators(cfg)


def build_dataset(cfg: Config) -> Dataset:
    """The training set named by ``data.name``; it has ``num_classes`` and ``ds[i] -> (image, label)``.

    With ``data.label_noise > 0`` it is wrapped in :class:`LabelNoise` (seeded by ``cfg.seed``).
    """
    _check_name(cfg)
    dataset = DATASETS.build(cfg.data.name, cfg=cfg)
    return LabelNoise(dataset, cfg.data.label_noise, cfg.seed) if cfg.data.label_noise > 0 else dataset


def build_unlabelled(cfg: Config) -> Dataset | None:
    """``data.unlabelled`` as training tensors ``ds[i] -> ((3, S, S) float32, -1)``: a RecordIO prefix (when its
    ``.rec`` exists; labels ignored) or an image folder (every image under it); None when not set."""
    path = cfg.data.unlabelled
    if path is None:
        return None
    from faceforge.data.unlabelled import Unlabelled, UnlabelledFolder

    if Path(path + ".rec").is_file():
        from faceforge.data.recordio import RecordIODataset

        return _TrainImages(Unlabelled(RecordIODataset(prefix=path)), cfg.data.image_size)
    return _TrainImages(UnlabelledFolder(path), cfg.data.image_size)
