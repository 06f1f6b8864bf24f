"""Training batches: the typed `Batch`, the `SAMPLERS` registry, and the epoch sampler every run used so far.

A sampler turns a training set into this rank's micro-batches of one epoch. The trainer builds it once as
``SAMPLERS.build(data.sampler, context=SamplerContext(...), **data.sampler_kwargs)`` and then, per epoch,
iterates ``sampler.batches(epoch, start_micro)``; it checkpoints ``sampler.state_dict()``. A sampler
satisfies :class:`TrainSampler`. ``data.sampler`` may also be ``"package.module:callable"``.

The epoch sampler ("epoch", :class:`EpochSampler`), and what makes a killed-and-resumed run bit-identical:

* data order: the permutation of epoch ``e`` is a function of ``(seed, e)`` only
  (:func:`epoch_permutation`). Optimiser step ``s`` of the epoch reads the ``grad_accum`` consecutive global
  micro-batches ``perm[(s*A + a)*B*W : (s*A + a + 1)*B*W]``, and rank ``r`` takes every W-th image of each,
  starting at ``r`` (:func:`rank_positions`). So 2 ranks x batch B/2 see the same images per step as
  1 rank x batch B, and grad_accum=2 x B/2 the same as grad_accum=1 x B. A resumed run starts its
  iterator at the next micro-batch; nothing is re-read.
* flips: ``B*W*A`` uniforms per optimiser step from a dedicated ``torch.Generator`` (in ``state_dict``),
  drawn when the step's first micro-batch is taken and sliced exactly like the images, in the main
  process (DataLoader workers never draw).
* masks (``data.mask_ratio``): whether and how image ``i`` is masked in epoch ``e`` is a function of
  ``(seed, e, i)`` (``faceforge.data.masks``); nothing to save.
* AdaFace's augmentations (``data.augment``: crop, low resolution, photometric), after the mask and before the
  flip: likewise a function of ``(seed, e, i)`` per operation (``faceforge.data.augment``); nothing to save.
* the DataLoader gets its own generator, so that starting an epoch's iterator does not draw from the
  global torch RNG (which the trainer checkpoints for dropout).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from faceforge.data.augment import AdaFaceAugmentation
from faceforge.data.masks import MaskAugmentation
from faceforge.core.registry import Registry, unknown_kwargs

__all__ = [
    "AUGMENTED",
    "Batch",
    "CLASS_IMAGES",
    "ClassImageBatchSampler",
    "ClassImageSampler",
    "ClassImagesDataset",
    "EpochBatchSampler",
    "EpochSampler",
    "IndexedDataset",
    "MASKED",
    "SAMPLERS",
    "DeclaresExtras",
    "build_sampler",
    "SamplerContext",
    "TrainSampler",
    "decode_sample_ids",
    "encode_sample_ids",
    "epoch_permutation",
    "class_image_draws",
    "flip_images",
    "identity_blocks",
    "rank_positions",
]


# ----------------------------------------------------------------------------------------------
# The batch


def encode_sample_ids(indices: Tensor, flipped: Tensor) -> Tensor:
    """The id of a training *view*: ``2 * dataset index + (1 if flipped)``, int64 ``(B,)``."""
    return indices.long() * 2 + flipped.long()


def decode_sample_ids(ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(dataset indices (K,), flipped (K,) bool)`` of :func:`encode_sample_ids`' ids."""
    return ids // 2, (ids % 2).bool()


def flip_images(images: Tensor, mask: Tensor) -> Tensor:
    """Horizontally flip the images ``(B, 3, H, W)`` where ``mask (B,)`` is True."""
    return torch.where(mask[:, None, None, None], images.flip(-1), images)


AUGMENTED = "augmented"  # the Batch.extras key: (B,) bool, True where data.augment changed the image
MASKED = "masked"  # the Batch.extras key: (B,) bool, True where data.mask_ratio masked the image


@dataclass
class Batch:
    """One rank's micro-batch, as a sampler yields it and an objective reads it.

    Attributes:
        images: (B, 3, H, W) float32, normalised ``(x - 127.5) / 127.5``, already flipped where ``flipped``.
        labels: (B,) int64 class labels.
        sample_ids: (B,) int64 dataset indices of the images.
        flipped: (B,) bool, True where the image was flipped horizontally.
        extras: anything more a sampler gives (e.g. k images of the same identity per sample,
            ``(B, k, 3, H, W)``); tensors only, with the batch on dim 0. The epoch sampler gives
            ``masked`` (B,) bool when ``data.mask_ratio`` > 0 and ``augmented`` (B,) bool when ``data.augment``
            has a probability > 0 (:meth:`altered`).

    With ``data.unlabelled``, the last images of the batch are unlabelled: label -1, sample ids from
    ``len(training set)`` on (``faceforge.data.unlabelled``).
    """

    images: Tensor
    labels: Tensor
    sample_ids: Tensor
    flipped: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def view_ids(self) -> Tensor:
        """(B,) int64 ids of the views trained on (:func:`encode_sample_ids`: index and flip); a part that
        keeps past samples (BroadFace's queue) names them so, and the trainer's ``embed_fn`` reads them back."""
        return encode_sample_ids(self.sample_ids, self.flipped)

    def altered(self) -> Tensor:
        """(B,) bool on the CPU: images that a per-epoch augmentation changed (a mask, AdaFace's crop / low
        resolution / photometric jitter), so that they are not what their view id (index, flip) names: a cache
        keyed by view (the teacher's embeddings) must neither read nor write them."""
        altered = torch.zeros(len(self), dtype=torch.bool)
        for key in (MASKED, AUGMENTED):
            if key in self.extras:
                altered |= self.extras[key].cpu()
        return altered

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch with images, labels and extras on ``device`` (ids and flip mask stay where they are)."""
        return replace(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            extras={k: v.to(device, non_blocking=non_blocking) for k, v in self.extras.items()},
        )


# ----------------------------------------------------------------------------------------------
# The sampler contract


@dataclass(frozen=True)
class SamplerContext:
    """What the trainer tells a sampler: the training set (``ds[i] -> (image (3, H, W) float, label)``,
    with ``num_classes``), this rank's micro-batch size, the world, the seed, micro-batches per optimiser
    step and per epoch, whether to flip, and the DataLoader's workers and pinning.

    ``labels()``: every item's label, int64 ``(N,)``, read on the first call and kept (the trainer reads
    them without decoding an image where it can, e.g. from RecordIO headers); for a sampler that groups
    images by identity. None when the trainer gives none (then read ``dataset[i][1]``).
    """

    dataset: Dataset
    batch_size: int
    world_size: int
    rank: int
    seed: int
    grad_accum: int
    micro_per_epoch: int
    flip: bool = True
    num_workers: int = 0
    pin_memory: bool = False
    labels: Callable[[], Tensor] | None = None
    mask_ratio: float = 0.0  # data.mask_ratio: faceforge.data.masks, applied before the flip
    # data.augment: {crop, low_res, photometric} probabilities (faceforge.data.augment), after the mask, before the flip
    augment: dict[str, float] = field(default_factory=dict)
    unlabelled: Dataset | None = None  # data.unlabelled: ds[i] -> (image (3, H, W) float, -1)
    unlabelled_per_batch: int = 0  # unlabelled images after the labelled ones in each micro-batch


@runtime_checkable
class TrainSampler(Protocol):
    """What the trainer needs of a sampler (a factory in :data:`SAMPLERS` returns one).

    ``batches(epoch, start_micro)``: this rank's micro-batches ``start_micro .. micro_per_epoch - 1`` of
    ``epoch``, as :class:`Batch` es on the CPU; a pure function of (seed, epoch, world size, rank) and of the
    sampler's state. ``state_dict()`` / ``load_state_dict(state)``: that state (random generators), saved in
    every checkpoint, so that a resumed run draws what the uninterrupted one would have.
    """

    def batches(self, epoch: int, start_micro: int) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


SAMPLERS: Registry[TrainSampler] = Registry("sampler")


# ----------------------------------------------------------------------------------------------
# The epoch sampler


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> Tensor:
    """``(num_samples,)`` int64 permutation, a function of ``(seed, epoch)`` only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


def rank_positions(micro: int, batch_size: int, world_size: int, rank: int) -> range:
    """Positions in the epoch's permutation of rank ``rank``'s share of global micro-batch ``micro``.

    The global micro-batch is ``[micro*B*W, (micro+1)*B*W)``; the rank takes every W-th from ``rank``.
    """
    start = micro * batch_size * world_size
    return range(start + rank, start + batch_size * world_size, world_size)


class EpochBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches ``start_micro .. num_micro - 1`` of one epoch (drop_last), as index lists."""

    def __init__(
        self, num_samples: int, batch_size: int, world_size: int, rank: int, seed: int, epoch: int,
        start_micro: int, num_micro: int,
    ) -> None:
        self.num_samples, self.batch_size, self.world_size, self.rank = num_samples, batch_size, world_size, rank
        self.seed, self.epoch, self.start_micro, self.num_micro = seed, epoch, start_micro, num_micro

    def __iter__(self) -> Iterator[list[int]]:
        perm = epoch_permutation(self.num_samples, self.seed, self.epoch)
        for micro in range(self.start_micro, self.num_micro):
            positions = rank_positions(micro, self.batch_size, self.world_size, self.rank)
            yield perm[positions.start : positions.stop : positions.step].tolist()

    def __len__(self) -> int:
        return max(0, self.num_micro - self.start_micro)


class IndexedDataset(Dataset):
    """``ds[i] -> (image, label, i)``: a training set with each image's index."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        image, label = self.dataset[index]
        return image, label, index


@SAMPLERS.register("epoch")
class EpochSampler:
    """Every image once per epoch, in the order of :func:`epoch_permutation`, flipped with p = 0.5 (module doc).

    Args:
        context: the trainer's :class:`SamplerContext`.
    """

    provides_extras: tuple[str, ...] = ()  # Batch.extras keys (DeclaresExtras)

    def __init__(self, context: SamplerContext) -> None:
        self.context = context
        self.flip_generator = torch.Generator().manual_seed(context.seed + 0x5EED)
        self.masks = MaskAugmentation(context.mask_ratio, context.seed) if context.mask_ratio > 0 else None
        augment = AdaFaceAugmentation(**context.augment, seed=context.seed)
        self.augment = augment if augment.active else None

    def state_dict(self) -> dict[str, Any]:
        return {"flip": self.flip_generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flip_generator.set_state(state["flip"])

    def loader(self, epoch: int, start_micro: int) -> DataLoader:
        """The DataLoader of ``(images, labels, indices)`` for micro-batches ``start_micro ..`` of ``epoch``."""
        c = self.context
        sampler = EpochBatchSampler(
            len(c.dataset), c.batch_size, c.world_size, c.rank, c.seed, epoch, start_micro,  # type: ignore[arg-type]
            c.micro_per_epoch,
        )
        return DataLoader(
            IndexedDataset(c.dataset), batch_sampler=sampler, num_workers=c.num_workers, pin_memory=c.pin_memory,
            generator=torch.Generator().manual_seed(c.seed),
        )

    def batches(self, epoch: int, start_micro: int) -> Iterator[Batch]:
        c = self.context
        flips: Tensor | None = None
        for micro, (images, labels, indices, *extras) in enumerate(self.loader(epoch, start_micro), start=start_micro):
            a = micro % c.grad_accum
            images, altered = self._alter(images, indices, epoch)
            flipped = torch.zeros(len(indices), dtype=torch.bool)
            if c.flip:
                if a == 0 or flips is None:  # one draw per optimiser step, in the main process
                    flips = torch.rand(c.batch_size * c.world_size * c.grad_accum, generator=self.flip_generator)
                positions = rank_positions(a, c.batch_size, c.world_size, c.rank)
                flipped = flips[positions.start : positions.stop : positions.step] < 0.5
                images = flip_images(images, flipped)
            batch = Batch(images=images, labels=labels, sample_ids=indices.long(), flipped=flipped,
                          extras={**(extras[0] if extras else {}), **altered})  # a subclass's loader may add extras
            if c.unlabelled is not None and c.unlabelled_per_batch > 0:
                batch = self._with_unlabelled(batch, epoch * c.micro_per_epoch + micro, epoch)
            yield batch

    def _alter(self, images: Tensor, ids: Tensor, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The images (B, 3, H, W) of dataset ids (B,) masked (BigFace) then augmented (AdaFace), each a function of
        (seed, epoch, id); and the extras saying which: ``masked`` / ``augmented`` (B,) bool, for those that are on."""
        altered: dict[str, Tensor] = {}
        if self.masks is not None:
            images, altered[MASKED] = self.masks(images, ids, epoch)
        if self.augment is not None:
            images, applied = self.augment(images, ids, epoch)
            altered[AUGMENTED] = applied.any(dim=1)
        return images, altered

    def _with_unlabelled(self, batch: Batch, global_micro: int, epoch: int) -> Batch:
        """The batch followed by this rank's unlabelled images of ``global_micro`` (label -1, sample ids
        ``len(dataset) + j``), masked and flipped like the others (``faceforge.data.unlabelled``)."""
        from faceforge.data.unlabelled import UNLABELLED, stream_flips, stream_indices

        c = self.context
        assert c.unlabelled is not None
        u = c.unlabelled_per_batch
        idx = stream_indices(global_micro, u, c.world_size, c.rank, len(c.unlabelled), c.seed)  # type: ignore[arg-type]
        images = torch.stack([c.unlabelled[int(i)][0] for i in idx])
        ids = idx + len(c.dataset)  # type: ignore[arg-type]
        images, altered = self._alter(images, ids, epoch)
        flipped = stream_flips(global_micro, u, c.world_size, c.rank, c.seed) if c.flip else torch.zeros(u, dtype=torch.bool)
        images = flip_images(images, flipped)
        extras = {k: torch.cat([batch.extras[k], v]) for k, v in altered.items()}
        return Batch(
            images=torch.cat([batch.images, images]),
            labels=torch.cat([batch.labels, torch.full((u,), UNLABELLED, dtype=batch.labels.dtype)]),
            sample_ids=torch.cat([batch.sample_ids, ids]),
            flipped=torch.cat([batch.flipped, flipped]),
            extras=extras,
        )

# ----------------------------------------------------------------------------------------------
# AttFC's sampler: k class images per sample


CLASS_IMAGES = "class_images"  # the Batch.extras key: (B, k, 3, H, W) images of each sample's identity
_TAG_CLASS_IMAGES = 0xA77FC


def identity_blocks(labels: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``(order, first, count)`` of int64 labels ``(N,)``: ``order`` lists the dataset indices grouped by
    label (stable); item i's identity is ``order[first[i] : first[i] + count[i]]``. All int64 ``(N,)``."""
    y = torch.as_tensor(labels, dtype=torch.long)
    order = torch.sort(y, stable=True).indices
    _, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return order, starts[inverse], counts[inverse]


def class_image_draws(seed: int, epoch: int, step: int, n: int, k: int) -> tuple[Tensor, Tensor]:
    """``(choice (n, k) float64, flip (n, k) float32)`` uniforms of optimiser step ``step`` of ``epoch``: a
    function of ``(seed, epoch, step)`` only, for the step's ``n`` = B W A global samples in epoch order."""
    key = ((seed * 1_000_003 + epoch) * 1_000_003 + step) * 16 + _TAG_CLASS_IMAGES
    generator = torch.Generator().manual_seed(key % (2**63))
    return torch.rand(n, k, dtype=torch.float64, generator=generator), torch.rand(n, k, generator=generator)


class ClassImageBatchSampler(EpochBatchSampler):
    """:class:`EpochBatchSampler`'s micro-batches, each item a key ``(index, ((j, flip), ...))``: the image and
    k images of its identity, drawn with replacement (the image itself may be drawn; an identity with one
    image repeats it), each flipped with p = 0.5 when ``flip``. The draws of optimiser step s are
    :func:`class_image_draws` sliced like the images (:func:`rank_positions`), so W ranks x B/W, A
    micro-batches x B/A and 1 x B draw the same class images for the same image."""

    def __init__(self, blocks: tuple[Tensor, Tensor, Tensor], k: int, grad_accum: int, flip: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.order, self.first, self.count = blocks
        self.k, self.grad_accum, self.flip = k, grad_accum, flip

    def __iter__(self) -> Iterator[list[Any]]:
        per_step = self.batch_size * self.world_size * self.grad_accum
        draws: tuple[Tensor, Tensor] | None = None
        for micro, indices in enumerate(super().__iter__(), start=self.start_micro):
            step, a = divmod(micro, self.grad_accum)
            if a == 0 or draws is None:
                draws = class_image_draws(self.seed, self.epoch, step, per_step, self.k)
            positions = rank_positions(a, self.batch_size, self.world_size, self.rank)
            choice, flip = (d[positions.start : positions.stop : positions.step] for d in draws)
            index = torch.tensor(indices, dtype=torch.long)
            count = self.count[index].unsqueeze(1)
            offset = torch.minimum((choice * count).long(), count - 1)  # uniform over the identity's images
            extra = self.order[self.first[index].unsqueeze(1) + offset]
            flipped = (flip < 0.5) if self.flip else torch.zeros_like(flip, dtype=torch.bool)
            yield [(i, tuple(zip(extra[b].tolist(), flipped[b].tolist()))) for b, i in enumerate(indices)]


class ClassImagesDataset(Dataset):
    """``ds[(i, ((j, flip), ...))] -> (image i, label i, i, {"class_images": (k, 3, H, W)})``, images j flipped
    where asked (each class image its own augmentation)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, tuple[tuple[int, bool], ...]]) -> tuple[Any, Any, int, dict[str, Tensor]]:
        index, extra = key
        image, label = self.dataset[index]
        images = [self.dataset[j][0] for j, _ in extra]
        images = [im.flip(-1) if flipped else im for im, (_, flipped) in zip(images, extra)]
        return image, label, index, {CLASS_IMAGES: torch.stack(images)}


@SAMPLERS.register("attfc")
class ClassImageSampler(EpochSampler):
    """AttFC's sampler: the epoch sampler's images and flips, plus, per image, ``k`` other images of the same
    identity in ``Batch.extras["class_images"]`` ``(B, k, 3, H, W)`` (:class:`ClassImageBatchSampler`).

    Deterministic in (seed, epoch) whatever the world size or accumulation; the draws need no state. Works for
    any training set: the labels come from ``context.labels()`` (the trainer reads recordio headers, folder,
    synthetic, glyph and label-noise labels without decoding an image), else from ``dataset[i][1]``.

    Args:
        context: the trainer's :class:`SamplerContext`.
        k: class images per sample (AttFC Table 3; default 2, the paper's).
    """

    provides_extras = (CLASS_IMAGES,)

    def __init__(self, context: SamplerContext, k: int = 2) -> None:
        super().__init__(context)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"data.sampler_kwargs.k = {k!r}: expected the number of class images per sample, an int >= 1")
        self.k = k
        if context.labels is not None:  # the trainer's: read without decoding images where it can
            labels = context.labels()
        else:
            labels = torch.tensor([int(context.dataset[i][1]) for i in range(len(context.dataset))])  # type: ignore[arg-type]
        self.blocks = identity_blocks(labels)

    def loader(self, epoch: int, start_micro: int) -> DataLoader:
        c = self.context
        sampler = ClassImageBatchSampler(
            self.blocks, self.k, c.grad_accum, c.flip,
            num_samples=len(c.dataset), batch_size=c.batch_size, world_size=c.world_size,  # type: ignore[arg-type]
            rank=c.rank, seed=c.seed, epoch=epoch, start_micro=start_micro, num_micro=c.micro_per_epoch,
        )
        return DataLoader(
            ClassImagesDataset(c.dataset), batch_sampler=sampler, num_workers=c.num_workers, pin_memory=c.pin_memory,
            generator=torch.Generator().manual_seed(c.seed),
        )


@runtime_checkable
class DeclaresExtras(Protocol):
    """A sampler that says which ``Batch.extras`` keys its batches carry (``provides_extras``), so that an
    objective that needs one (AttFC's class images) is refused before step 1 with another sampler."""

    provides_extras: tuple[str, ...]


def build_sampler(name: str, context: SamplerContext, kwargs: dict[str, Any], *, needs: tuple[str, ...] = (),
                  needed_by: str = "the objective") -> TrainSampler:
    """``SAMPLERS.build(name, context=context, **kwargs)``, with ``data.sampler_kwargs`` first checked against the
    factory's signature: a key it does not take is a ValueError ``data.sampler_kwargs.<key>: ...`` (one line).
    ``needs``: the extras the objective reads (``needed_by`` names it); a sampler that declares its extras
    (:class:`DeclaresExtras`) without one of them is a ValueError ``data.sampler: ...``."""
    factory = SAMPLERS.get(name)
    unknown = unknown_kwargs(factory, kwargs, fixed=("context",))
    if unknown:
        raise ValueError(f"data.sampler_kwargs.{unknown[0]}: sampler {name!r} does not take it; expected the keyword "
                         f"arguments of {getattr(factory, '__qualname__', name)}")
    sampler = factory(context=context, **kwargs)
    missing = [key for key in needs if isinstance(sampler, DeclaresExtras) and key not in sampler.provides_extras]
    if missing:
        raise ValueError(f"data.sampler: {name!r}: {needed_by}: the batch has no extras[{missing[0]!r}] from this "
                         f"sampler; expected a sampler that gives it (attfc for class images)")
    return sampler
