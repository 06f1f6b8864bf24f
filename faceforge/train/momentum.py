"""A momentum copy of a backbone (AttFC's class encoder, MoCo's key encoder):

    theta_ce <- gamma theta_ce + (1 - gamma) theta_fe        (AttFC Eq. 12, gamma = 0.999; MoCo Eq. 2)

on parameters only: buffers (BatchNorm running statistics) are the copy's own, updated by its own forward
passes, as in the official code. The copy is taken from the trained backbone at the first update (not at
construction), so that it starts from the weights the run really starts from: after a checkpoint's
``model.init_from``, and after DDP has broadcast rank 0's backbone. It encodes in train mode (BatchNorm on
batch statistics) under ``no_grad``, as the official code's ``module.train()`` leaves it.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["MomentumEncoder"]


class MomentumEncoder(nn.Module):
    """A frozen copy of ``backbone``, moved towards it by :meth:`update` (Eq. 12) and run by :meth:`encode`.

    Args:
        backbone: the trained backbone (the feature encoder); deep-copied, gradients off.
        momentum: gamma in [0, 1] (default 0.999; 0 = a plain copy of the current backbone each step).

    State (``state_dict``): ``encoder.*`` (the copy's parameters and buffers) and ``started`` (a bool
    buffer: False until the first update copies the backbone).
    """

    def __init__(self, backbone: nn.Module, momentum: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum={momentum!r}: expected gamma in [0, 1] (AttFC Eq. 12; 0.999 in the paper)")
        self.momentum = float(momentum)
        self.encoder = copy.deepcopy(backbone)
        self.encoder.requires_grad_(False)
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, backbone: nn.Module) -> None:
        """Eq. 12 on every parameter (the first call copies ``backbone``'s parameters and buffers instead)."""
        mine, theirs = list(self.encoder.parameters()), [p.detach() for p in backbone.parameters()]
        if len(mine) != len(theirs):
            raise ValueError(f"momentum encoder: {len(mine)} parameters, the backbone has {len(theirs)}")
        if not bool(self.started):  # the copy the official code takes at construction; Eq. 12 would leave it as is
            self.encoder.load_state_dict(backbone.state_dict())
            self.started.fill_(True)
            return
        torch._foreach_mul_(mine, self.momentum)
        torch._foreach_add_(mine, theirs, alpha=1.0 - self.momentum)  # theta_ce = gamma theta_ce + (1 - gamma) theta_fe

    @torch.no_grad()
    def encode(self, images: Tensor, amp_dtype: torch.dtype | None = None) -> Tensor:
        """Embeddings (N, D) of images (N, 3, H, W): the copy in train mode, no gradient, autocast when asked."""
        self.encoder.train()
        with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return self.encoder(images)
