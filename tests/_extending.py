"""The worked examples of ``docs/extending.md``: a head, a sampler and an objective written outside faceforge,
using only its public seams, and selected by ``"package.module:callable"`` in a config (no engine edit).

- :class:`CosineHead`: a ``ClassifierHead`` (NormFace's normalised softmax) that opts into ``TrainHooks``:
  it renormalises its class rows after every optimiser step, keeps a count outside its ``state_dict``
  (``extra_state``) and reports its rows' norms as diagnostics.
- :class:`MirrorSampler`: the epoch sampler, plus the mirror image of every sample in ``Batch.extras``.
- :class:`MirrorConsistency`: classification + a consistency term between an image's embedding and its
  mirror's, embedded by a momentum copy of the backbone that the objective owns (not trained by the
  optimiser, checkpointed, updated after each optimiser step): the pattern of AttFC's class encoder.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faceforge.data.samplers import Batch, EpochSampler, SamplerContext
from faceforge.heads.base import ClassifierHead, RowShard, TrainHooks
from faceforge.train.objectives import Objective


class CosineHead(nn.Module, ClassifierHead, TrainHooks):
    """Normalised softmax: l_i = -log softmax(s cos(x_i, W_j))_{y_i}  (NormFace Eq. 2 with unit rows)."""

    provides_diagnostics = True

    def __init__(self, num_classes: int, embedding_size: int, s: float = 16.0) -> None:
        super().__init__()
        self.s = s
        self.weight = nn.Parameter(F.normalize(torch.randn(num_classes, embedding_size), dim=1))
        self.updates = 0  # optimiser steps seen: state outside the state_dict, saved by extra_state

    def per_sample_loss(self, embeddings: Tensor, labels: Tensor, *, classifier_grad: bool = True) -> Tensor:
        weight = self.weight if classifier_grad else self.weight.detach()
        cos = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).T
        return F.cross_entropy(self.s * cos, labels, reduction="none")

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.per_sample_loss(embeddings, labels).mean()

    # --- TrainHooks ---

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        self.weight.copy_(F.normalize(self.weight, dim=1))
        self.updates = step

    def diagnostics(self, embed_fn: Callable[[Tensor], Tensor]) -> dict[str, float]:
        return {"row_norm_max": float(self.weight.detach().norm(dim=1).max())}

    def extra_state(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])


class MirrorSampler(EpochSampler):
    """The epoch sampler's batches, each with ``extras["mirror"]``: the images flipped horizontally (B, 3, H, W)."""

    def __init__(self, context: SamplerContext) -> None:
        super().__init__(context)

    def batches(self, epoch: int, start_micro: int) -> Iterator[Batch]:
        for batch in super().batches(epoch, start_micro):
            batch.extras["mirror"] = batch.images.flip(-1)
            yield batch


class MirrorConsistency(Objective, TrainHooks):
    """``{"classification": head(f(x), y), "consistency": weight * mean(1 - cos(f(x), f_ema(mirror(x))))}``.

    f_ema is a momentum copy of the backbone: theta_ema <- m theta_ema + (1 - m) theta after every
    optimiser step (parameters only; buffers copied), run in eval mode without gradient.
    """

    def __init__(
        self, backbone: nn.Module, head: nn.Module, amp_dtype: torch.dtype | None = None,
        weight: float = 0.5, momentum: float = 0.9,
    ) -> None:
        super().__init__(backbone, head, amp_dtype)
        self.weight, self.momentum = weight, momentum
        self.owned["ema"] = copy.deepcopy(backbone).requires_grad_(False).eval()

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        embeddings = self.embed(batch.images).float()
        with torch.no_grad():
            target = self.owned["ema"](batch.extras["mirror"]).float()
        consistency = (1.0 - F.cosine_similarity(embeddings, target, dim=1)).mean()
        return {"classification": self.head(embeddings, batch.labels), "consistency": self.weight * consistency}

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        ema = self.owned["ema"]
        for p_ema, p in zip(ema.parameters(), self.backbone.parameters()):
            p_ema.mul_(self.momentum).add_(p, alpha=1.0 - self.momentum)
        for b_ema, b in zip(ema.buffers(), self.backbone.buffers()):
            b_ema.copy_(b)


class RankLocalHead(CosineHead):
    """A head whose weight is the rank's own (``row_shards``): the trainer does not average its gradients over
    ranks, and sums their squared norm over ranks for clipping. A checkpoint holds every rank's weight as the
    rows of one logical tensor (rank r's at rows [r C, (r + 1) C)), and each rank reads its own back.

    The pattern of a class-sharded head (rank r holds rows [c0, c1) of W, ``faceforge.heads.parallel``),
    reduced to what the seam needs.
    """

    provides_diagnostics = False

    def row_shards(self) -> dict[str, RowShard]:
        dist = torch.distributed
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        rows = self.weight.shape[0]
        return {"weight": RowShard(rank * rows, (rank + 1) * rows, world * rows)}


class SameIdentitySampler(EpochSampler):
    """The epoch sampler's batches, each with ``extras["same_identity"]`` (B, 3, H, W): for every sample, the
    next image of its identity in index order (cyclically; an identity with one image gives that image), found
    from ``context.labels()``. The shape of AttFC's loader of k images per identity, with k = 1."""

    def __init__(self, context: SamplerContext) -> None:
        super().__init__(context)
        assert context.labels is not None, "the trainer gives every item's label"
        labels = context.labels()
        order = torch.argsort(labels, stable=True)
        ordered = labels[order]
        first = torch.searchsorted(ordered, ordered)  # where each identity's run starts in `order`
        following = torch.arange(1, len(order) + 1)
        same = torch.zeros(len(order), dtype=torch.bool)
        same[:-1] = ordered[1:] == ordered[:-1]
        self.partner = torch.empty_like(order)
        self.partner[order] = order[torch.where(same, following, first)]

    def batches(self, epoch: int, start_micro: int) -> Iterator[Batch]:
        for batch in super().batches(epoch, start_micro):
            partners = self.partner[batch.sample_ids]
            batch.extras["same_identity"] = torch.stack([self.context.dataset[int(i)][0] for i in partners])
            yield batch
