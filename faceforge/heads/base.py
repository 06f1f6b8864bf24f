"""What every head shares: the `HEADS` registry, the written contract between the trainer and a head,
and the helpers of the chunked kernels.

A head is an `nn.Module` called as ``loss = head(embeddings (B, D), labels (B,))`` that owns its class
proxies (pytorch-metric-learning's convention). `heads.build(name, **kwargs)` makes a registered one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from faceforge.registry import Registry

HEADS: Registry[nn.Module] = Registry("head")


# ----------------------------------------------------------------------------------------------------------
# The contract between the trainer and a head (protocols)


# ----------------------------------------------------------------------------------------------------------
# End of the contract.
#
# Below: helpers shared by the chunked kernels (softmax.py, sphereface2.py, broadface.py).
#


# ----------------------------------------------------------------------------------------------------------
# Chunked-kernel helpers
#
# The margin heads (softmax.py), SphereFace2 (sphereface2.py) and BroadFace's row blocks (broadface.py) walk
# the classes in chunks through these small pure functions.

BUFFER_POLICIES = ("auto", "reuse", "release")


def check_size(name: str, value: int) -> int:
    """`value` as an int; ValueError naming `name` unless it is a positive integer."""
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


def check_buffer_policy(policy: str) -> str:
    """`policy` if it is one of BUFFER_POLICIES ("auto", "reuse", "release"), else ValueError."""
    if policy not in BUFFER_POLICIES:
        raise ValueError(f"buffers={policy!r}; expected one of {list(BUFFER_POLICIES)}")
    return policy


def resolve_buffer_policy(policy: str, device: torch.device) -> str:
    """"auto" is "reuse" on CPU (fresh pages cost a kernel zeroing pass, benchmarks/RESULTS.md §1 and §13) and
    "release" elsewhere (a CUDA caching allocator already reuses freed blocks at no cost)."""
    if policy == "auto":
        return "reuse" if device.type == "cpu" else "release"
    return policy


def check_inputs(embeddings: Tensor, labels: Tensor, num_classes: int, embedding_size: int) -> Tensor:
    """Check shapes, dtype and range; return labels as int64. Errors name the bad value and what was expected."""
    if embeddings.dim() != 2 or embeddings.shape[1] != embedding_size:
        raise ValueError(f"embeddings of shape {tuple(embeddings.shape)}; expected (B, {embedding_size})")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels of shape {tuple(labels.shape)}; expected ({embeddings.shape[0]},), one per embedding")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels of dtype {labels.dtype}; expected an integer dtype (int64)")
    if labels.numel() == 0:
        raise ValueError("empty batch: expected at least one embedding")
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"label {int(labels[position])} at position {position} is out of range; expected 0 <= label < "
            f"num_classes={num_classes}"
        )
    return labels.long()


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 if any input is float64: logits and softmax never run in half precision."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def row_norms(rows: Tensor) -> Tensor:
    """|rows_i| (n,) of an (n, D) tensor, clamped at the dtype's smallest normal number (no division by 0)."""
    return torch.linalg.vector_norm(rows, dim=1).clamp_min(torch.finfo(rows.dtype).tiny)


def chunks(num_classes: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(c0, c1), ...]: consecutive blocks of `chunk_size` classes (the last may be shorter)."""
    return [(c0, min(c0 + chunk_size, num_classes)) for c0 in range(0, num_classes, chunk_size)]


def chunk_rows(weight: Tensor, c0: int, c1: int, dtype: torch.dtype, workspace: Tensor | None) -> Tensor:
    """weight[c0:c1] in `dtype`: the rows themselves when already in it, else copied into `workspace`
    (preallocated, at least (c1 - c0, D), so that a bf16 W costs no allocation per chunk)."""
    rows = weight[c0:c1]
    if rows.dtype == dtype:
        return rows
    if workspace is None:
        return rows.to(dtype)
    return workspace[: c1 - c0].copy_(rows)


def target_input(x: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, normalize: bool) -> Tensor:
    """q_b: cos(theta_{b y_b}) when normalising, else the plain target logit x_b . W_y + b_y. Shape (B,)."""
    w_y = weight[labels].to(x.dtype)
    q = (x * w_y).sum(1)
    if normalize:
        return q / row_norms(w_y)
    return q + bias[labels].to(x.dtype) if bias is not None else q


def add_target_grads(
    grad_q: Tensor,
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    normalize: bool,
    grad_x: Tensor | None,
    grad_w: Tensor | None,
    grad_b: Tensor | None,
) -> None:
    """Chain dL/dq_b through q_b = x_b . W_y / |W_y| (or x_b . W_y + b_y) into the gradient tensors, in place."""
    w_y = weight[labels].to(x.dtype)
    g = grad_q.unsqueeze(1)
    if normalize:
        n_y = row_norms(w_y).unsqueeze(1)
        cos_y = (x * w_y).sum(1, keepdim=True) / n_y
        dq_dx, dq_dw = w_y / n_y, x / n_y - cos_y * w_y / n_y.square()
    else:
        dq_dx, dq_dw = w_y, x
    if grad_x is not None:
        grad_x.add_(g * dq_dx)
    # index_put_(accumulate=True), not index_add_: the same sum, 12 x faster for 128 rows on CPU (RESULTS §10)
    if grad_w is not None:
        grad_w.index_put_((labels,), (g * dq_dw).to(grad_w.dtype), accumulate=True)
    if grad_b is not None:
        grad_b.index_put_((labels,), grad_q.to(grad_b.dtype), accumulate=True)


def softplus(z: Tensor) -> Tensor:
    """log(1 + exp(z)) without overflow, exact for very negative z (log1p inside torch.logaddexp), and without
    F.softplus's linear cut-off above z = 20."""
    return torch.logaddexp(z, torch.zeros((), dtype=z.dtype, device=z.device))
