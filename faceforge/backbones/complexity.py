"""Model size and cost: parameter counts and multiply-accumulate counts ("FLOPs" as insightface reports them).

`python -m faceforge.backbones.complexity` prints the table of every registered backbone (the one in
docs/backbones.md). Models may be built on the meta device (`with torch.device("meta"): ...`): both
counts then cost no memory, so even r1200 is counted in seconds.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import torch
from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements; with `trainable_only`, only those with requires_grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _conv_macs(module: nn.Conv2d, output: torch.Tensor) -> int:
    # each output element: (C_in / groups) * kh * kw multiply-adds
    per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return output.numel() * per_output


def _linear_macs(module: nn.Linear, output: torch.Tensor) -> int:
    return output.numel() * module.in_features


_MAC_RULES = {nn.Conv2d: _conv_macs, nn.Linear: _linear_macs}


def _counted(module: nn.Module) -> bool:
    """Counted by a rule of its type, or by its own ``macs(inputs, output)`` method (the products a
    module computes outside Conv2d / Linear children, such as attention's q k^T and attn v)."""
    return isinstance(module, tuple(_MAC_RULES)) or callable(getattr(module, "macs", None))


def count_flops(model: nn.Module, input_size: int | None = None) -> int:
    """Multiply-accumulates of every Conv2d and Linear, and of every module with a ``macs(inputs, output)``
    method (a ViT's attention products), for ONE (1, 3, S, S) image.

    "FLOPs" here means multiply-accumulates (MACs), the unit insightface calls "GFLOPs" (r50 6.3 G,
    r100 12.1 G, mbf 0.45 G, ViT-T 1.5 G, ViT-B 11 G at 112x112). BN, LayerNorm, PReLU, softmax,
    additions and biases are not counted.
    `input_size` defaults to `model.input_size` if the model has one, else 112. The dummy forward runs
    in eval mode under no_grad, on the model's device (meta works); the train/eval mode is restored.
    """
    if input_size is None:
        input_size = getattr(model, "input_size", 112)
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        rule = next((fn for kind, fn in _MAC_RULES.items() if isinstance(module, kind)), None)
        total += rule(module, output) if rule is not None else module.macs(inputs, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if _counted(m)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


# ----------------------------------------------------------------------------------------------
# The table of docs/backbones.md

# Small CPU demo nets, counted at 56x56: (name, keyword arguments).
DEMO_CONFIGS: list[tuple[str, dict]] = [
    ("r18", {"width": 0.25}),
    ("r18", {"width": 0.5}),
    ("r50", {"width": 0.25}),
    ("r100", {"width": 0.25}),
    ("mobilefacenet", {"scale": 1}),
    ("vit_t", {"width": 0.25}),
]


def complexity_row(name: str, input_size: int, **kwargs) -> tuple[str, float, float]:
    """(depths, parameters in M, GMACs) of `build(name, input_size=input_size, **kwargs)`, built on meta."""
    from faceforge.backbones import build

    with torch.device("meta"):
        model = build(name, input_size=input_size, **kwargs)
    return str(model.blocks_per_stage), count_parameters(model) / 1e6, count_flops(model, input_size) / 1e9


def format_table(rows: Sequence[tuple[str, str, str, float, float]]) -> str:
    lines = [
        "| backbone | options | blocks per stage | parameters (M) | GFLOPs (G MACs) |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    lines += [f"| {n} | {o} | {d} | {p:.1f} | {f:.3f} |" for n, o, d, p, f in rows]
    return "\n".join(lines)


def preset_names() -> list[str]:
    """The rows of the presets table: every registered name except the generic "iresnet" and the alias
    "mbf"; the IResNets first and the ViTs last, each in size order."""
    from faceforge.backbones import BACKBONES
    from faceforge.backbones.iresnet import IRESNET_LAYERS
    from faceforge.backbones.vit import VIT_PRESETS

    skip = {*IRESNET_LAYERS, *VIT_PRESETS, "iresnet", "mbf"}
    return [*IRESNET_LAYERS, *(name for name in BACKBONES.names() if name not in skip), *VIT_PRESETS]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print parameters and GFLOPs of every registered backbone.")
    parser.add_argument("--input-size", type=int, default=112, help="image side of the presets (112)")
    parser.add_argument("--demo-size", type=int, default=56, help="image side of the demo nets (56)")
    args = parser.parse_args(argv)

    rows = [(name, "", *complexity_row(name, args.input_size)) for name in preset_names()]
    print(f"Presets at {args.input_size}x{args.input_size}, 512-D embedding:\n")
    print(format_table(rows))
    demo = [
        (name, ", ".join(f"{k}={v}" for k, v in kw.items()), *complexity_row(name, args.demo_size, **kw))
        for name, kw in DEMO_CONFIGS
    ]
    print(f"\nSmall CPU demo nets at {args.demo_size}x{args.demo_size}, 512-D embedding:\n")
    print(format_table(demo))


if __name__ == "__main__":
    main()
