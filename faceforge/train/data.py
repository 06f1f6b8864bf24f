"""Training and verification data named by ``data.name``: the built-in synthetic identities, insightface
RecordIO, or an image folder.

``DATASETS`` maps ``data.name`` to (training set builder, held-out verification sets builder). A training
set has ``num_classes`` and ``ds[i] -> ((3, H, W) float tensor normalised (x - 127.5) / 127.5, label)``;
the verification builder returns ``{name: (images uint8 (2N, H, W, 3), issame (N,))}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from faceforge.train import distributed as fdist
from faceforge.train.checkpoint import CHECKPOINT_NAME
from faceforge.train.config import Config, ConfigError

__all__ = ["DATASETS", "LABEL_MAP_NAME", "build_dataset", "build_verification_sets", "synthetic_held_out_pairs"]

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


class _TrainImages(Dataset):
    """A decoded-image dataset (``ds[i] -> (uint8 HWC, label)``) as training tensors.

    ``ds[i] -> ((3, S, S) float32 normalised (x - 127.5) / 127.5, label)``; an image that is not
    ``image_size`` square raises ValueError naming the file / record (nothing is resized).
    """

    def __init__(self, dataset: Any, image_size: int) -> None:
        self.dataset = dataset
        self.image_size = image_size

    @property
    def num_classes(self) -> int:
        return int(self.dataset.num_classes)

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self, index: int) -> str:
        describe = getattr(self.dataset, "describe", None)
        if describe is not None:
            return describe(index)
        keys = getattr(self.dataset, "keys", None)
        rec = getattr(self.dataset, "rec_path", None)
        if rec is not None and keys is not None:
            return f"{rec}: index {index} (key {keys[index]})"
        return f"image {index}"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from faceforge.data.transforms import to_tensor

        image, label = self.dataset[index]
        s = self.image_size
        if image.shape != (s, s, 3):
            raise ValueError(
                f"{self.describe(index)}: image is {image.shape[1]}x{image.shape[0]} but data.image_size is {s}; "
                f"images are not resized (align/crop them to {s}x{s} first)"
            )
        return to_tensor(image), int(label)


def _require_path(cfg: Config, what: str) -> str:
    if not cfg.data.path:
        raise ConfigError(f"data.path is required for data.name = {cfg.data.name!r} ({what}); it is {cfg.data.path!r}")
    return cfg.data.path


def _recordio_train(cfg: Config) -> Dataset:
    from faceforge.data.recordio import RecordIODataset

    prefix = _require_path(cfg, "the prefix of the .rec/.idx files")
    return _TrainImages(RecordIODataset(prefix=prefix), cfg.data.image_size)


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
    return _TrainImages(dataset, cfg.data.image_size)


def _bin_eval(cfg: Config) -> dict[str, tuple[Any, Any]]:
    """``{name: (images, issame)}`` for every ``data.eval_bins`` file (name = file stem, made unique)."""
    from faceforge.data.pairs import load_bin

    sets: dict[str, tuple[Any, Any]] = {}
    for path in cfg.data.eval_bins:
        images, issame = load_bin(path)
        s = cfg.data.image_size
        if images.shape[1:3] != (s, s):
            raise ValueError(
                f"{path}: verification images are {images.shape[2]}x{images.shape[1]} but data.image_size is {s}"
            )
        name, n = Path(path).stem, 2
        while name in sets:
            name, n = f"{Path(path).stem}_{n}", n + 1
        sets[name] = (images, issame)
    return sets


# data.name -> (training set builder, held-out verification sets builder). The training set has
# ``num_classes`` and ``ds[i] -> ((3, H, W) float tensor, label)``; the verification builder returns
# ``{name: (images uint8 (2N, H, W, 3), issame (N,))}`` (``{}`` = no verification; metric names are
# prefixed ``name/`` unless name is "").
DATASETS: dict[str, tuple[Callable[[Config], Dataset], Callable[[Config], dict[str, tuple[Any, Any]]]]] = {
    "synthetic": (_synthetic_train, _synthetic_eval),
    "recordio": (_recordio_train, _bin_eval),
    "folder": (_folder_train, _bin_eval),
}


def _dataset_entry(cfg: Config) -> tuple[Callable[[Config], Dataset], Callable[[Config], dict[str, tuple[Any, Any]]]]:
    if cfg.data.name not in DATASETS:
        raise ValueError(f"data.name = {cfg.data.name!r}: expected one of {sorted(DATASETS)}")
    return DATASETS[cfg.data.name]


def build_verification_sets(cfg: Config) -> dict[str, tuple[Any, Any]]:
    """The held-out verification sets of ``cfg``: ``{name: (images uint8 (2N, H, W, 3), issame (N,))}``.

    Synthetic data: one set named "" of ``data.eval_pairs`` pairs of test-split identities; recordio and
    folder: the ``data.eval_bins``, named after their files. Empty when there are none.
    """
    return _dataset_entry(cfg)[1](cfg)


def build_dataset(cfg: Config) -> Dataset:
    """The training set named by ``data.name``; it has ``num_classes`` and ``ds[i] -> (image, label)``."""
    return _dataset_entry(cfg)[0](cfg)
