"""What a run measures while it trains: its evaluation sets (:class:`RunEvaluation`) and the current
embeddings of training images for the parts' diagnostics (:func:`embed_training_images`)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from faceforge.data.samplers import decode_sample_ids, flip_images
from faceforge.train import distributed as fdist
from faceforge.core.config import Config
from faceforge.train.preflight import open_evaluators

__all__ = ["RunEvaluation", "embed_training_images"]


class RunEvaluation:
    """The run's evaluation sets, every one read and checked when this is built (rank 0 evaluates; the other
    ranks hold none). ``runs``: whether any rank evaluates (the same on every rank)."""

    def __init__(self, cfg: Config, main: bool, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.sets: list[Any] = _agreed(lambda: open_evaluators(cfg) if main else [], "evaluation sets", device)
        self.runs = _any_rank(bool(self.sets), device)

    def evaluate(self, backbone: nn.Module) -> dict[str, float]:
        """Every set's numbers (held-out pairs, IJB, identification, retrieval), keys prefixed ``<set name>/``."""
        metrics: dict[str, float] = {}
        for s in self.sets:
            numbers = s.evaluate(backbone, self.cfg.data.image_size, batch_size=self.cfg.data.eval_batch_size,
                                 device=self.device)
            prefix = f"{s.name}/" if s.name else ""
            metrics.update({f"{prefix}{k}": float(v) for k, v in numbers.items()})
        return metrics


def embed_training_images(ids: Tensor, *, backbone: nn.Module, embed: Callable[..., Tensor], dataset: Any,
                          batch_size: int, device: torch.device) -> Tensor:
    """Current embeddings (K, D) float32 of the training images named by view ids ``ids`` (K,) (``Batch.view_ids``):
    the same image and flip as when trained, the backbone in eval mode, no gradient; ``embed``: the objective's."""
    indices, flipped = decode_sample_ids(ids.cpu())
    was_training = backbone.training
    backbone.eval()
    embeddings = []
    try:
        with torch.no_grad():
            for k0 in range(0, len(indices), batch_size):
                part = range(k0, min(k0 + batch_size, len(indices)))
                images = torch.stack([dataset[int(indices[k])][0] for k in part])
                images = flip_images(images, flipped[part.start : part.stop]).to(device)
                embeddings.append(embed(images, synced=False).float())
    finally:
        backbone.train(was_training)
    return torch.cat(embeddings)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` or'ed over the ranks (itself without torch.distributed)."""
    if not fdist.is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _agreed(build: Callable[[], Any], what: str, device: torch.device) -> Any:
    """``build()`` on every rank; under torch.distributed, when it fails on one rank the others raise too
    (instead of waiting at the next collective), naming ``what``."""
    if not fdist.is_distributed():
        return build()
    error: BaseException | None = None
    try:
        result = build()
    except Exception as e:  # re-raised below, after every rank knows
        error, result = e, None
    failed = torch.tensor([1.0 if error is not None else 0.0], device=device)
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise ValueError(f"{what}: another rank's check failed (its error is in its output)")
    return result
