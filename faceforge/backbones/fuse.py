"""Fold BatchNorm into the convolution (or Linear) before it, for inference (BigFace Sec. 3: "most BN
layers are folded into the preceding convolutions after training").

In eval mode a BN is a per-channel affine map, so ``BN(conv(x))`` is one convolution:

    s  = gamma / sqrt(running_var + eps)            (per output channel)
    W' = W * s          b' = (b - running_mean) * s + beta

:func:`fuse_bn` finds every BN whose input is the output of a ``Conv1d/2d/3d`` or ``Linear`` and that
output feeds nothing else, folds the BN into that layer (computed in float64, then cast back) and puts
an ``nn.Identity`` in the BN's place. The pairs are found by running the model once on an example
input while counting, for every tensor, the operations that consume it (module hooks plus a
``TorchFunctionMode``), so it works on any backbone without per-architecture code, and never folds a
BN whose convolution output is also read elsewhere (a residual branch, say).

BNs that stay are skipped, not forced: :func:`unfoldable` names each with its reason. IResNet's ``bn1``
at the start of every block (it comes before a padded 3x3 conv; folding it forward would change the zero
padding) and ``bn2`` before the dropout-flatten-FC output stay. A ViT's two feature BN1d fold into their
Linears; its LayerNorms are no BatchNorm (they normalise each token by its own statistics) and stay as
they are. See ``docs/backbones.md``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["FOLDABLE_LAYERS", "batchnorms", "fold_into", "foldable_pairs", "fuse_bn", "unfoldable"]

FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BN = nn.modules.batchnorm._BatchNorm


def batchnorms(model: nn.Module) -> list[str]:
    """Names of the BatchNorm modules of ``model`` (what :func:`fuse_bn` left, when called on its result)."""
    return [name for name, m in model.named_modules() if isinstance(m, _BN)]


class _CountUses(TorchFunctionMode):
    """Counts, per tensor id, the torch operations that read it and return a tensor (shape queries
    such as ``x.dim()`` do not count). Every tensor seen is kept alive, so ids stay unique."""

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[int, int] = {}
        self.alive: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
            for t in tree_flatten((args, kwargs or {}))[0]:
                if isinstance(t, torch.Tensor):
                    self.uses[id(t)] = self.uses.get(id(t), 0) + 1
                    self.alive.append(t)
        return out


def _example_input(model: nn.Module) -> torch.Tensor:
    size = getattr(model, "input_size", None)
    if not isinstance(size, int):
        raise ValueError(f"{type(model).__name__} has no int `input_size`: pass example=(B, 3, H, W) to fuse_bn")
    p = next(model.parameters(), None)
    return torch.zeros(1, 3, size, size, dtype=p.dtype if p is not None else torch.float32,
                       device=p.device if p is not None else None)


def foldable_pairs(model: nn.Module, example: torch.Tensor | None = None) -> list[tuple[str, str]]:
    """``[(layer name, BN name)]``: BNs (in eval mode, with running statistics) whose input is the output
    of a conv / Linear layer that nothing else reads, in forward order. Runs ``model`` once in eval mode
    on ``example`` (default: zeros ``(1, 3, S, S)`` with ``S = model.input_size``); modes are restored."""
    return _trace(model, example)[0]


def unfoldable(model: nn.Module, example: torch.Tensor | None = None) -> dict[str, str]:
    """``{BN name: why it cannot be folded}`` for every BN of ``model`` that :func:`fuse_bn` leaves, in
    module order: its input is not a conv / Linear output, that output is also read elsewhere, it keeps no
    running statistics, it normalises another dimension than the layer's channels, or the forward on
    ``example`` never ran it. Empty when every BN folds (MobileFaceNet, SFNet-BN, the ViTs)."""
    return _trace(model, example)[1]


def _trace(model: nn.Module, example: torch.Tensor | None) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The foldable pairs and the reason each other BN stays, from one eval-mode forward on ``example``."""
    x = _example_input(model) if example is None else example
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, str] = {}  # id(output tensor) -> the conv/linear that made it
    candidates: list[tuple[str, str, int]] = []
    reasons: dict[str, str] = {}

    def after(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(module, FOLDABLE_LAYERS) and isinstance(output, torch.Tensor):
            produced[id(output)] = names[module]
            counter.alive.append(output)

    def before(module: nn.Module, args: Any) -> None:
        if not isinstance(module, _BN):
            return
        name = names[module]
        if len(args) != 1 or id(args[0]) not in produced:
            reasons[name] = "its input is not the output of a conv / Linear layer"
            return
        layer_name = produced[id(args[0])]
        layer = model.get_submodule(layer_name)
        if not (module.track_running_stats and module.running_mean is not None):
            reasons[name] = "it keeps no running statistics (batch statistics even in eval mode)"
        elif not _shapes_fit(layer, module, args[0]):
            reasons[name] = f"it does not normalise the output channels of {layer_name} (another dimension)"
        else:
            candidates.append((layer_name, name, id(args[0])))

    modes = {m: m.training for m in model.modules()}
    handles = [h for m in model.modules() if m is not model
               for h in (m.register_forward_hook(after), m.register_forward_pre_hook(before))]
    counter = _CountUses()
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    seen_layers: set[str] = set()
    pairs = []
    for layer, bn, tensor_id in candidates:
        if counter.uses.get(tensor_id, 0) == 1 and layer not in seen_layers:  # the BN is its only reader
            pairs.append((layer, bn))
            seen_layers.add(layer)
        else:
            reasons[bn] = f"the output of {layer} is also read elsewhere (folding would change that reader too)"
    for bn in batchnorms(model):
        reasons.setdefault(bn, "the forward pass on the example input never ran it")
    folded = {bn for _, bn in pairs}
    return pairs, {bn: reasons[bn] for bn in batchnorms(model) if bn not in folded}


def _shapes_fit(layer: nn.Module, bn: nn.Module, output: torch.Tensor) -> bool:
    """The BN normalises dim 1 of the layer's output, whose size is the layer's output channels."""
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if isinstance(layer, nn.Linear) and output.ndim != 2:  # (B, L, D) with a BN1d over L: not per-feature
        return False
    return bn.num_features == channels == output.shape[1]


def fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """In place: ``layer`` (conv / Linear) becomes ``bn(layer(x))`` for an eval-mode ``bn``; gains a bias
    if it had none. Computed in float64 and cast back to the layer's dtype."""
    w = layer.weight.detach().double()
    mean, var = bn.running_mean.detach().double(), bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)  # BN in eval mode: gamma (x - mean) / sqrt(var + eps) + beta
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(mean)
    shape = (-1,) + (1,) * (w.ndim - 1)
    dtype, device = layer.weight.dtype, layer.weight.device
    with torch.no_grad():
        layer.weight.copy_((w * scale.reshape(shape)).to(dtype))
        new_bias = ((b - mean) * scale + beta).to(dtype=dtype, device=device)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias, requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(new_bias)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def fuse_bn(model: nn.Module, example: torch.Tensor | None = None, inplace: bool = False) -> nn.Module:
    """``model`` with every BN that follows a conv / Linear folded into it, in eval mode.

    Args:
        model: any backbone ``(B, 3, S, S) -> (B, D)``; only its eval-mode output is preserved (the
            folded BNs no longer update running statistics, so do not train the result).
        example: one input for the trace (default zeros ``(1, 3, S, S)``, ``S = model.input_size``).
        inplace: fold into ``model`` itself instead of a deep copy.

    Returns:
        The fused model, in eval mode; ``batchnorms(result)`` names the BNs that could not be folded, and
        :func:`unfoldable` on ``model`` says why each stays.
    """
    fused = model if inplace else copy.deepcopy(model)
    for layer, bn in foldable_pairs(fused, example):
        fold_into(fused.get_submodule(layer), fused.get_submodule(bn))
        _replace(fused, bn, nn.Identity())
    return fused.eval()
