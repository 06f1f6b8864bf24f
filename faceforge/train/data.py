"""Training and verification data named by ``data.name``: the built-in synthetic identities, insightface
RecordIO, an image folder, or rendered font glyphs; and label noise over any of them (``data.label_noise``).

``DATASETS`` (a ``faceforge.core.registry.Registry``) maps ``data.name`` to the training set's factory and
``VERIFICATION_SETS`` the same name to its held-out verification sets' factory
(``-> {name: (images uint8 (2N, H, W, 3), issame (N,))}``; a name without one has no held-out sets). A factory
takes keyword arguments only: its own (``data.kwargs``, checked against its signature and type hints when the
config is read, before step 1) and the run facts it names among :data:`RUN_FACTS` (``image_size``, ``seed``,
``path``, ``output``, ``bad_records``), never the whole config. ``data.name`` may be ``"package.module:callable"``,
a training set factory (its kwargs are checked when it is built). A training set is a
:class:`faceforge.data.TrainingSet`: ``num_classes`` and ``ds[i] -> ((3, H, W) float tensor normalised
(x - 127.5) / 127.5, label)``; :class:`faceforge.data.TrainImages` makes one of decoded uint8 images.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset

from faceforge.data.glyphs import CHARSETS
from faceforge.data.source import BadRecordError, DatasetView, SourceError, TrainImages, open_source
from faceforge.core.registry import Registry
from faceforge.train import distributed as fdist
from faceforge.core.checkpoint import CHECKPOINT_NAME
from faceforge.core.config import Config, ConfigError, check_value, factory_keywords

__all__ = [
    "BadRecordError", "DATASETS", "VERIFICATION_SETS", "LABEL_MAP_NAME", "LabelNoise", "RUN_FACTS", "build_dataset",
    "build_verification_sets", "build_unlabelled", "dataset_labels", "glyph_benchmark_of",
    "resolve_data_kwargs", "run_facts", "shuffled_labels", "synthetic_held_out_pairs",
]

# the arguments the trainer passes a data factory itself (from the config's shared keys), never data.kwargs
RUN_FACTS: dict[str, str] = {
    "image_size": "data.image_size", "seed": "seed", "path": "data.path", "output": "output",
    "bad_records": "data.skip_bad (output/bad_records.txt or None)",
}

_AT_LEAST_1 = (lambda v: v >= 1, "an int >= 1")
_AT_LEAST_0 = (lambda v: v >= 0, "an int >= 0")
_TWO_PEOPLE = (lambda v: v >= 2, "an int >= 2 (negative pairs need two people)")
_IN_0_1 = (lambda v: 0.0 <= v <= 1.0, "a float in [0, 1]")


def _ranges(**ranges: tuple[Callable[[Any], bool], str]) -> Callable[[Callable], Callable]:
    """Declare value ranges of a factory's kwargs (``kwarg_ranges``), checked with its types when the config is read."""
    def mark(factory: Callable) -> Callable:
        factory.kwarg_ranges = ranges  # type: ignore[attr-defined]
        return factory
    return mark


@_ranges(num_identities=_AT_LEAST_1, images_per_identity=_AT_LEAST_1,
         difficulty=(lambda v: v >= 0, "a float >= 0"))
def synthetic_train(*, image_size: int, seed: int, num_identities: int = 1000, images_per_identity: int = 20,
                    difficulty: float = 1.0, cache: bool = False) -> Dataset:
    """``num_identities x images_per_identity`` train-split synthetic identities (``cache``: render once)."""
    from faceforge.data.synthetic import SyntheticFaces

    return SyntheticFaces(num_identities, images_per_identity, split="train", seed=seed,
                          difficulty=difficulty, image_size=image_size, cache=cache)


@_ranges(eval_pairs=_AT_LEAST_0, eval_identities=_TWO_PEOPLE, difficulty=(lambda v: v >= 0, "a float >= 0"))
def synthetic_verification(*, image_size: int, seed: int, difficulty: float = 1.0, eval_pairs: int = 1000,
                           eval_identities: int = 200) -> dict[str, tuple[Any, Any]]:
    """``{"": (images, issame)}``: ``eval_pairs`` pairs of ``eval_identities`` test-split (never trained)
    synthetic identities (metric names unprefixed), or ``{}`` when ``eval_pairs`` is 0."""
    from faceforge.data.synthetic import synthetic_pairs

    if eval_pairs == 0:
        return {}
    return {"": synthetic_pairs(eval_pairs, num_identities=eval_identities, seed=seed, difficulty=difficulty,
                                image_size=image_size, split="test")}


def synthetic_held_out_pairs(cfg: Config) -> tuple[Any, Any]:
    """The synthetic held-out pairs of ``cfg`` (``data.kwargs.eval_pairs`` pairs; the demo's table)."""
    return build_verification_sets(cfg)[""]


def _bad_records_path(cfg: Config) -> Path | None:
    """``output/bad_records.txt`` with ``data.skip_bad``, else None (an unreadable record stops the run)."""
    from faceforge.train.lifecycle import BAD_RECORDS_NAME

    return Path(cfg.output) / BAD_RECORDS_NAME if cfg.data.skip_bad else None


def _require_path(path: str | None, name: str, what: str) -> str:
    if not path:
        raise ConfigError(f"data.path is required for data.name = {name!r} ({what}); it is {path!r}")
    return path


def recordio_train(*, path: str | None, image_size: int, bad_records: Path | None) -> Dataset:
    """The insightface ``.rec``/``.idx`` at ``path`` (the prefix); record headers checked now."""
    from faceforge.data.recordio import RecordIODataset

    prefix = _require_path(path, "recordio", "the prefix of the .rec/.idx files")
    # an image of more than 4 crops of pixels is refused from its header (a bomb is never decoded); smaller
    # ones of the wrong size are named by TrainImages
    dataset = RecordIODataset(prefix=prefix, max_pixels=4 * image_size**2)
    _check_record_headers(dataset, skip_bad=bad_records is not None)
    return TrainImages(dataset, image_size, bad_records)


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


def folder_train(*, path: str | None, image_size: int, output: str, bad_records: Path | None) -> Dataset:
    """The image folder at ``path``; its ``{folder: label}`` map is kept in ``output/label_map.json``.

    When the output folder already holds a checkpoint and a label map, the map is reused, so that a
    resumed run gives every identity the head row it had; otherwise labels follow the sorted folder
    names and the map is (re)written.
    """
    from faceforge.data.folder import ImageFolderDataset

    root = _require_path(path, "folder", "a folder with one sub-folder per identity")
    label_map = Path(output) / LABEL_MAP_NAME
    reuse = label_map.is_file() and (Path(output) / CHECKPOINT_NAME).is_file()
    dataset = ImageFolderDataset(root, class_to_label=label_map if reuse else None)
    if not reuse and fdist.get_rank() == 0:
        dataset.save_label_map(label_map)
    return TrainImages(dataset, image_size, bad_records)


def _bin_eval(paths: list[str], s: int) -> dict[str, tuple[Any, Any]]:
    """``{name: (images, issame)}`` for every ``data.eval_bins`` file (name = file stem, made unique)."""
    from faceforge.data.pairs import load_bins

    sets = load_bins(paths, expect_size=s, expect_name="data.image_size")  # headers checked first
    for path, (images, _) in zip(paths, sets.values()):
        if images.shape[1:3] != (s, s):
            raise ValueError(
                f"{path}: verification images are {images.shape[2]}x{images.shape[1]} but data.image_size is {s}"
            )
    return sets


def _glyph_benchmark(path: str | None, image_size: int, seed: int, glyph_charset: str, num_identities: int,
                     eval_identities: int, glyph_held_out_families: int, glyph_variants: int,
                     glyph_min_coverage: float) -> Any:
    from faceforge.data.glyphs import DEFAULT_FONT_DIR, glyph_benchmark

    return glyph_benchmark(path or DEFAULT_FONT_DIR, glyph_charset, num_identities, eval_identities,
                           glyph_held_out_families, seed, image_size, glyph_variants, glyph_min_coverage)


_GLYPH_RANGES = dict(glyph_charset=(lambda v: v in CHARSETS, f"one of {sorted(CHARSETS)}"), num_identities=_AT_LEAST_1, eval_identities=_TWO_PEOPLE, eval_pairs=_AT_LEAST_0,
                     glyph_held_out_families=_AT_LEAST_0, glyph_variants=_AT_LEAST_1, glyph_min_coverage=_IN_0_1)


@_ranges(**_GLYPH_RANGES)
def glyph_train(*, path: str | None, image_size: int, seed: int, glyph_charset: str = "cjk",
                num_identities: int = 1000, eval_identities: int = 200, glyph_held_out_families: int = 0,
                glyph_variants: int = 1, glyph_min_coverage: float = 0.25) -> Dataset:
    """``num_identities`` training characters, each drawn in every font under ``path`` (the benchmark renders once
    per process for both factories; ``faceforge.data.glyphs.glyph_benchmark``)."""
    return _glyph_benchmark(path, image_size, seed, glyph_charset, num_identities, eval_identities,
                            glyph_held_out_families, glyph_variants, glyph_min_coverage).train_set()


@_ranges(**_GLYPH_RANGES)
def glyph_verification(*, path: str | None, image_size: int, seed: int, glyph_charset: str = "cjk",
                       num_identities: int = 1000, eval_identities: int = 200, glyph_held_out_families: int = 0,
                       glyph_variants: int = 1, glyph_min_coverage: float = 0.25,
                       eval_pairs: int = 1000) -> dict[str, tuple[Any, Any]]:
    """``eval_pairs`` pairs of the ``eval_identities`` test characters (``{}`` when it is 0)."""
    if eval_pairs == 0:
        return {}
    return {"": _glyph_benchmark(path, image_size, seed, glyph_charset, num_identities, eval_identities,
                                 glyph_held_out_families, glyph_variants, glyph_min_coverage).pairs(eval_pairs)}


def glyph_benchmark_of(cfg: Config) -> Any:
    """The glyph benchmark of ``cfg`` (``faceforge.data.glyphs.GlyphBenchmark``, memoised per process)."""
    k = cfg.data.kwargs
    return _glyph_benchmark(cfg.data.path, cfg.data.image_size, cfg.seed, k["glyph_charset"], k["num_identities"],
                            k["eval_identities"], k["glyph_held_out_families"], k["glyph_variants"],
                            k["glyph_min_coverage"])


# data.name -> the training set factory (kwargs + run facts) -> a faceforge.data.TrainingSet; and the held-out
# verification sets factory -> ``{name: (images uint8 (2N, H, W, 3), issame (N,))}`` (``{}`` = no verification;
# metric names are prefixed ``name/`` unless name is ""). Both take the same data.kwargs (each the keys it names).
DATASETS: Registry[Dataset] = Registry("dataset")
VERIFICATION_SETS: Registry[dict[str, tuple[Any, Any]]] = Registry("verification set")
for _name, _train, _eval in (
    ("synthetic", synthetic_train, synthetic_verification),
    ("recordio", recordio_train, None),
    ("folder", folder_train, None),
    ("glyphs", glyph_train, glyph_verification),
):
    DATASETS.register(_name)(_train)
    if _eval is not None:
        VERIFICATION_SETS.register(_name)(_eval)


def _check_name(cfg: Config) -> None:
    if not DATASETS.is_known(cfg.data.name):
        raise ValueError(f"data.name = {cfg.data.name!r}: expected {DATASETS.expected()}")


def _factories(name: str) -> list[Callable]:
    """The training set factory of ``name`` and its verification sets factory when it has one."""
    return [DATASETS.get(name), *([VERIFICATION_SETS.get(name)] if name in VERIFICATION_SETS else [])]


def _defaults(factory: Callable) -> dict[str, Any]:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not p.empty and p.name not in RUN_FACTS}


def resolve_data_kwargs(name: str, kwargs: dict[str, Any], source: str = "<config>",
                        spelled: dict[str, str] | None = None) -> dict[str, Any]:
    """``data.kwargs`` of source ``name`` checked and completed: every key must be a keyword of its training
    or verification factory (not a run fact), of the type the factory's hint says (ints are not floats,
    bools not numbers) and in its declared range; the factories' defaults fill the keys not given.

    ``spelled``: how a key was written when it came from an old flat key (``data.num_identities``), for the
    message. Raises :class:`ConfigError` naming ``data.kwargs.<key>`` and what is accepted.
    """
    spelled = spelled or {}
    factories = _factories(name)
    accepted: set[str] | None = set()
    for factory in factories:
        keywords = factory_keywords(factory)
        accepted = None if keywords is None or accepted is None else accepted | keywords
    resolved = {k: v for f in reversed(factories) for k, v in _defaults(f).items()}
    for key, value in kwargs.items():
        where = spelled.get(key, f"data.kwargs.{key}")
        if key in RUN_FACTS:
            raise ConfigError(f"{source}: {where}: set by the trainer from {RUN_FACTS[key]}; remove it from data.kwargs")
        if accepted is not None and key not in accepted:
            raise ConfigError(f"{source}: {where}: not an argument of data source {name!r}; expected one of: "
                              f"{', '.join(sorted(accepted - set(RUN_FACTS) - {'self'})) or '(none)'}")
        for factory in factories:
            hint = _hints(factory).get(key)
            if hint is not None:
                value = check_value(value, hint, where, source)
            ok, expected = getattr(factory, "kwarg_ranges", {}).get(key, (None, None))
            if ok is not None and not ok(value):
                raise ConfigError(f"{source}: {where} = {value!r}: expected {expected}")
        resolved[key] = value
    return resolved


def _hints(factory: Callable) -> dict[str, Any]:
    target = factory.__init__ if isinstance(factory, type) else factory
    try:
        return typing.get_type_hints(target)
    except Exception:  # an out-of-tree factory's unresolvable hints: its values are its own to check
        return {}


def run_facts(cfg: Config) -> dict[str, Any]:
    """The run facts a data factory may name (:data:`RUN_FACTS`), from the shared config keys."""
    return {"image_size": cfg.data.image_size, "seed": cfg.seed, "path": cfg.data.path, "output": str(cfg.output),
            "bad_records": _bad_records_path(cfg)}


def _call(factory: Callable, facts: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """``factory`` called with ``kwargs`` it accepts and the run facts it names (all of them when it takes any)."""
    keywords = factory_keywords(factory)
    chosen = {**facts, **kwargs} if keywords is None else \
        {k: v for k, v in {**facts, **kwargs}.items() if k in keywords}
    return factory(**chosen)


def _kwargs_of(cfg: Config) -> dict[str, Any]:
    """``data.kwargs``, resolved now for an out-of-tree ``package.module:callable`` (registered names were
    resolved when the config was read)."""
    if ":" in cfg.data.name:
        return resolve_data_kwargs(cfg.data.name, cfg.data.kwargs)
    return cfg.data.kwargs


def build_verification_sets(cfg: Config) -> dict[str, tuple[Any, Any]]:
    """The held-out verification sets of ``cfg``: ``{name: (images uint8 (2N, H, W, 3), issame (N,))}``.

    Synthetic data: one set named "" of ``data.kwargs.eval_pairs`` pairs of test-split identities; glyphs: one
    set named "" of pairs of test characters; recordio and folder: none of their own. Then, for any
    ``data.name``, the ``data.eval_bins``, named after their files. Empty when there are none. Label noise
    never touches these.
    """
    _check_name(cfg)
    sets = _call(VERIFICATION_SETS.get(cfg.data.name), run_facts(cfg), _kwargs_of(cfg)) \
        if cfg.data.name in VERIFICATION_SETS else {}
    if cfg.data.eval_bins:
        sets.update(_bin_eval(cfg.data.eval_bins, cfg.data.image_size))
    return sets


def dataset_labels(dataset: Any) -> np.ndarray:
    """int64 ``(N,)`` label of every item: the dataset's ``labels`` (or its wrapped ``dataset``'s), RecordIO
    record headers (no image decoded), or, failing both, ``dataset[i][1]`` for every item."""
    inner = getattr(dataset, "dataset", dataset)  # TrainImages wraps the decoded-image dataset
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


class LabelNoise(DatasetView):
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


def build_dataset(cfg: Config) -> Dataset:
    """The training set named by ``data.name``; it has ``num_classes`` and ``ds[i] -> (image, label)``.

    With ``data.label_noise > 0`` it is wrapped in :class:`LabelNoise` (seeded by ``cfg.seed``).
    """
    _check_name(cfg)
    dataset = _call(DATASETS.get(cfg.data.name), run_facts(cfg), _kwargs_of(cfg))
    return LabelNoise(dataset, cfg.data.label_noise, cfg.seed) if cfg.data.label_noise > 0 else dataset


def build_unlabelled(cfg: Config) -> Dataset | None:
    """``data.unlabelled`` as training tensors ``ds[i] -> ((3, S, S) float32, -1)``: a RecordIO prefix (when its
    ``.rec`` exists; labels ignored) or an image folder (every image under it); None when not set."""
    path = cfg.data.unlabelled
    if path is None:
        return None
    from faceforge.data.unlabelled import Unlabelled, UnlabelledFolder

    try:
        found = open_source(path)
    except SourceError as e:
        raise ConfigError(f"data.unlabelled: {e}") from None
    if found.format == "rec":
        from faceforge.data.recordio import RecordIODataset

        return TrainImages(Unlabelled(RecordIODataset(prefix=found.path)), cfg.data.image_size)
    if found.format == "bin":
        raise ConfigError(f"data.unlabelled = {path!r}: a .bin holds verification pairs; expected an image folder "
                          "or a .rec/.idx prefix")
    return TrainImages(UnlabelledFolder(found.path), cfg.data.image_size)
