"""Margin-softmax heads over a full class-weight matrix, computed in class chunks (ArcFace Eq. 4).

    L = (1/N) sum_b [ log(exp(t_b) + sum_{j != y_b} exp(z_bj)) - t_b ]
    z_bj = s cos(theta_bj) = s <x_b/|x_b|, W_j/|W_j|>,    t_b = s psi(theta_{b y_b})     (margin.py)

The loss is one `torch.autograd.Function` (`_ChunkedMarginCE`) with a hand-written backward:

- forward writes z chunk by chunk into ONE preallocated (B, C) buffer (x_hat @ W_c^T, then divided by the
  chunk's row norms in place: W is never normalised into a copy), puts t_b in the target column and takes a
  stable logsumexp chunk by chunk. The buffer is saved for backward (no recompute).
- backward turns the buffer into softmax probabilities chunk by chunk and writes grad W into one (C, D)
  tensor with `torch.mm(out=grad_W[c0:c1])`, including the row-normalisation term
  d cos_bj / d W_j = x_hat_b / |W_j| - cos_bj W_j / |W_j|^2.
- the (B, C) buffer and grad W are lent by the head's `ReusableBuffer`s (buffers.py), so a training loop
  reuses last step's memory instead of paying the kernel to zero 2 GB of fresh pages every step.
- the target cosine cos_y (B,) is computed inside too, and its gradient (through the margin, exact or
  straight-through, and the optional Eq. 5 term) comes from autograd of the small (B,) function psi, then is
  scattered into grad W with `index_put_(accumulate=True)`. So W has a single gradient tensor: extra memory is the (B, C)
  buffer plus grad W, i.e. (1 + B/D) |W| (1.25 |W| for B = 128, D = 512).

Logits, logsumexp and softmax are float32 (or float64 when W is) whatever autocast says.
`head.logits(...)` is the plain (B, C) formulation, for small C and for checking.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faceforge.heads.buffers import ReusableBuffer
from faceforge.heads.margin import MARGIN_GRADS, apply_margin, check_margins, target_logit
from faceforge.heads.regularizers import inter_class_loss, intra_class_angle
from faceforge.heads.base import HEADS, ClassifierHead

DEFAULT_CHUNK_SIZE = 65536  # classes per block: (B, 65536) float32 temporaries, 32 MiB at B = 128

TargetFn = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------------------------------------
# the chunked cross-entropy


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 if any input is float64: logits and softmax never run in half precision."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _row_norms(rows: Tensor) -> Tensor:
    return torch.linalg.vector_norm(rows, dim=1).clamp_min(torch.finfo(rows.dtype).tiny)


def _chunks(num_classes: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(c0, min(c0 + chunk_size, num_classes)) for c0 in range(0, num_classes, chunk_size)]


class _ChunkedMarginCE(torch.autograd.Function):
    """(lse (B,), t (B,), penalty (B,)): the per-sample loss is lse_b - t_b + penalty_b, where t_b = target_fn(q_b),
    penalty_b = penalty_fn(q_b) and lse_b = log sum_j exp(z_bj) with t_b in the target column.

    normalize=True:  z_bj = scale * x_b . W_j / |W_j| and q_b = x_b . W_y / |W_y| (x is already unit-norm).
    normalize=False: z_bj = x_b . W_j + bias_j         and q_b = z_{b y_b}   (plain softmax; scale unused).

    A label -1 means "the target class is not among these rows" (a class shard, parallel.py): that row's lse
    runs over the non-target logits only and its t_b and penalty_b are 0.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        target_fn: TargetFn,
        penalty_fn: TargetFn | None,
        scale: float,
        normalize: bool,
        chunk_size: int,
        buffers: tuple[ReusableBuffer, ReusableBuffer] | None,
    ) -> Tensor:
        batch, num_classes = x.shape[0], weight.shape[0]
        dtype = x.dtype
        all_rows = torch.arange(batch, device=x.device)
        logits = buffers[0].get((batch, num_classes), x) if buffers else x.new_empty(batch, num_classes)
        norms = x.new_empty(num_classes) if normalize else None
        for c0, c1 in _chunks(num_classes, chunk_size):
            w_c = weight[c0:c1].to(dtype)
            z_c = logits[:, c0:c1]
            torch.mm(x, w_c.t(), out=z_c)
            if normalize:
                torch.linalg.vector_norm(w_c, dim=1, out=norms[c0:c1])
                norms[c0:c1].clamp_min_(torch.finfo(dtype).tiny)
                z_c.mul_(scale / norms[c0:c1])  # s cos(theta_bj)
            elif bias is not None:
                z_c.add_(bias[c0:c1].to(dtype))
        rows, labels = target_rows(labels)
        q = _target_input(_take_rows(x, rows), weight, bias, labels, normalize)
        target, penalty = _target_terms(q, target_fn, penalty_fn, grad=False)
        logits[_take_rows(all_rows, rows), labels] = target
        workspace = x.new_empty(batch, min(chunk_size, num_classes))  # one (B, chunk) temporary, reused
        lse = _logsumexp_chunked(logits, chunk_size, workspace)
        ctx.save_for_backward(x, weight, bias, labels, logits, lse, norms, q)
        ctx.rows = rows
        ctx.fns = (target_fn, penalty_fn)
        ctx.scale, ctx.normalize, ctx.chunk_size, ctx.buffers = scale, normalize, chunk_size, buffers
        # lse is returned as a copy: an output saved for backward would keep itself alive under saved-tensor hooks
        return lse.clone(), _scatter_rows(target, rows, batch), _scatter_rows(penalty, rows, batch)  # Eq. 4 terms

    @staticmethod
    def backward(ctx: Any, grad: Tensor, grad_target: Tensor, grad_penalty: Tensor):  # type: ignore[override]
        x, weight, bias, labels, logits, lse, norms, q = ctx.saved_tensors
        rows = ctx.rows
        scale, normalize = ctx.scale, ctx.normalize
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dtype = x.dtype
        grad = grad.to(dtype)  # d L / d lse_b

        # target path: d L / d t_b = grad_b p_{b y_b} + grad_target_b, d L / d penalty_b = grad_penalty_b,
        # then autograd through psi
        q_leaf = q.detach().requires_grad_(True)
        with torch.enable_grad():
            target, penalty = _target_terms(q_leaf, *ctx.fns, grad=True)
            p_target = torch.exp(target.detach() - _take_rows(lse, rows))
            outputs = [target] + ([penalty] if penalty.requires_grad else [])
            grads = [_take_rows(grad, rows) * p_target + _take_rows(grad_target.to(dtype), rows)]
            grads += [_take_rows(grad_penalty.to(dtype), rows)] if penalty.requires_grad else []
            (grad_q,) = torch.autograd.grad(outputs, q_leaf, grads, allow_unused=True)
        if grad_q is None:  # the target logit does not depend on q (cannot happen for the presets)
            grad_q = torch.zeros_like(q)

        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = None  # every row is written by the chunk loop
        if need_w:
            grad_w = ctx.buffers[1].get(weight.shape, weight) if ctx.buffers else torch.empty_like(weight)
        grad_b = torch.zeros_like(bias) if (need_b and bias is not None) else None
        # exclude the target column from the non-target softmax: exp(very negative) = 0 and 0 * it stays 0
        logits[_take_rows(torch.arange(x.shape[0], device=x.device), rows), labels] = torch.finfo(dtype).min
        workspace = x.new_empty(x.shape[0], min(ctx.chunk_size, weight.shape[0]))
        for c0, c1 in _chunks(weight.shape[0], ctx.chunk_size):
            z_c = logits[:, c0:c1]
            g_c = torch.sub(z_c, lse.unsqueeze(1), out=workspace[:, : c1 - c0])
            g_c.exp_().mul_(grad.unsqueeze(1))  # dL/dz_bj = grad_b p_bj, j != y_b
            w_c = weight[c0:c1].to(dtype)
            if grad_b is not None:
                grad_b[c0:c1] = g_c.sum(0)
            if normalize:
                # sum_b g_bj cos_bj, needed for the row-normalisation term (the buffer is consumed here)
                radial = z_c.mul_(g_c).sum(0).div_(scale)
                g_c.mul_(scale / norms[c0:c1])  # dL/d(x_b . W_j)
            if grad_x is not None:
                grad_x.addmm_(g_c, w_c)
            if grad_w is not None:
                if normalize:  # the radial part first: - (s / |W_j|^2) (sum_b g_bj cos_bj) W_j
                    coef = radial.mul_(-scale / norms[c0:c1].square()).unsqueeze(1)
                    _mul_into(w_c, coef, grad_w[c0:c1])
                    _addmm_into(g_c.t(), x, grad_w[c0:c1])  # + sum_b (s / |W_j|) g_bj x_b
                else:
                    _mm_into(g_c.t(), x, grad_w[c0:c1])
        _add_target_grads(grad_q, x, weight, labels, normalize, grad_x, grad_w, grad_b, rows=rows)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def target_rows(labels: Tensor) -> tuple[Tensor | None, Tensor]:
    """(rows (K,), their labels (K,)): the batch rows whose label is >= 0, i.e. whose target class is among the
    classes at hand (a label -1 marks a row whose class lives elsewhere, on another shard); rows = None when
    that is every row (then the labels are returned as they are)."""
    keep = labels >= 0
    if bool(keep.all()):
        return None, labels
    return keep.nonzero().squeeze(1), labels[keep]


def _take_rows(values: Tensor, rows: Tensor | None) -> Tensor:
    """values[rows] along dim 0 (``values`` itself for rows = None: every row)."""
    return values if rows is None else values[rows]


def _scatter_rows(values: Tensor, rows: Tensor | None, batch: int) -> Tensor:
    """(batch,) zeros with ``values`` (K,) at ``rows``; ``values`` itself for rows = None (every row)."""
    if rows is None:
        return values
    return values.new_zeros(batch).index_copy_(0, rows, values)


def _mm_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out = a @ b, written in place (cast when out is stored in another dtype than the computation)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _mul_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out = a * b (broadcast), written in place."""
    if out.dtype == a.dtype:
        torch.mul(a, b, out=out)
    else:
        out.copy_(a * b)


def _addmm_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out += a @ b, in place (cast when out is stored in another dtype than the computation)."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    else:
        out.add_(a @ b)


def _target_input(x: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, normalize: bool) -> Tensor:
    """q_b: cos(theta_{b y_b}) when normalising, else the plain target logit x_b . W_y + b_y. Shape (B,)."""
    w_y = weight[labels].to(x.dtype)
    q = (x * w_y).sum(1)
    if normalize:
        return q / _row_norms(w_y)
    return q + bias[labels].to(x.dtype) if bias is not None else q


def _target_terms(q: Tensor, target_fn: TargetFn, penalty_fn: TargetFn | None, grad: bool) -> tuple[Tensor, Tensor]:
    with torch.set_grad_enabled(grad):
        target = target_fn(q)
        penalty = penalty_fn(q) if penalty_fn is not None else torch.zeros_like(q)
    return target, penalty


def _add_target_grads(
    grad_q: Tensor,
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    normalize: bool,
    grad_x: Tensor | None,
    grad_w: Tensor | None,
    grad_b: Tensor | None,
    rows: Tensor | None = None,
) -> None:
    """Chain dL/dq_b through q_b = x_b . W_y / |W_y| (or x_b . W_y + b_y) into the gradient tensors, in place.

    rows: the batch rows that ``grad_q`` and ``labels`` (K,) belong to (``target_rows``); None = all of them.
    """
    if rows is not None:
        x_rows = torch.zeros_like(grad_x[rows]) if grad_x is not None else None
        _add_target_grads(grad_q, x[rows], weight, labels, normalize, x_rows, grad_w, grad_b)
        if grad_x is not None:
            grad_x.index_add_(0, rows, x_rows)
        return
    w_y = weight[labels].to(x.dtype)
    g = grad_q.unsqueeze(1)
    if normalize:
        n_y = _row_norms(w_y).unsqueeze(1)
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


def _logsumexp_chunked(logits: Tensor, chunk_size: int, workspace: Tensor) -> Tensor:
    """Row-wise logsumexp of a (B, C) matrix through a (B, chunk) workspace (torch.logsumexp copies it)."""
    row_max = logits.amax(dim=1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    total = torch.zeros_like(row_max)
    for c0, c1 in _chunks(logits.shape[1], chunk_size):
        total += torch.sub(logits[:, c0:c1], row_max.unsqueeze(1), out=workspace[:, : c1 - c0]).exp_().sum(1)
    return total.log_().add_(row_max)


def chunked_margin_cross_entropy(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    target_fn: TargetFn,
    *,
    bias: Tensor | None = None,
    penalty_fn: TargetFn | None = None,
    scale: float = 1.0,
    normalize: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    buffers: tuple[ReusableBuffer, ReusableBuffer] | None = None,
) -> Tensor:
    """Per-sample margin cross-entropy (B,) with the class dimension processed in chunks.

    Args:
        x: (B, D) embeddings, already unit-norm when `normalize` (they are cast to float32/float64).
        weight: (C, D) class weights; rows are normalised on the fly when `normalize`.
        labels: (B,) int64 in [0, C).
        target_fn: maps q (B,) to the scaled target logit t (B,); q = cos(theta_y) when `normalize`,
            else the plain target logit.
        bias: (C,) added to the logits when not normalising (plain softmax).
        penalty_fn: optional per-sample term of q added to the loss (the Eq. 5 intra-class angle).
        scale: s, multiplies the non-target cosines when `normalize`.
        buffers: (logit buffer, gradient of W) kept between calls (buffers.py); None allocates both afresh.
    Returns:
        (B,) loss_b = logsumexp_j z_bj (target column = t_b) - t_b + penalty_b.
    """
    lse, target, penalty = chunked_margin_terms(
        x, weight, labels, target_fn, bias=bias, penalty_fn=penalty_fn, scale=scale, normalize=normalize,
        chunk_size=chunk_size, buffers=buffers,
    )
    return lse - target + penalty  # ArcFace Eq. 4, per sample


def chunked_margin_terms(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    target_fn: TargetFn,
    *,
    bias: Tensor | None = None,
    penalty_fn: TargetFn | None = None,
    scale: float = 1.0,
    normalize: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    buffers: tuple[ReusableBuffer, ReusableBuffer] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The three terms (lse, t, penalty), each (B,), of :func:`chunked_margin_cross_entropy` (loss = lse - t + penalty),
    differentiable separately: a class shard (parallel.py) reduces lse across ranks as a logsumexp and t, penalty
    as sums. Arguments as there; a label -1 means the row's class is not among ``weight``'s rows (then t = penalty
    = 0 and lse runs over the non-target logits)."""
    dtype = _compute_dtype(x, weight)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _ChunkedMarginCE.apply(
            x.to(dtype), weight, bias, labels, target_fn, penalty_fn, float(scale), bool(normalize), int(chunk_size),
            buffers,
        )


# ----------------------------------------------------------------------------------------------------------
# argument checks shared by the heads


def _check_size(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


def _check_inputs(embeddings: Tensor, labels: Tensor, num_classes: int, embedding_size: int) -> Tensor:
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


# ----------------------------------------------------------------------------------------------------------
# the heads


@HEADS.register("margin_softmax")
class MarginSoftmax(nn.Module, ClassifierHead):
    """Combined-margin softmax head, ArcFace Eq. 4: target logit s (cos(m1 theta + m2) - m3), others s cos theta.

    Args:
        num_classes: C. embedding_size: D.
        s: feature scale (> 0). m1, m2, m3: margins (m1 > 0; m2 in radians).
        margin_grad: "exact" (autograd of the formula, default) or "detached" (straight-through, as
            insightface arcface_torch / OpenSphere).
        chunk_size: classes per block in the memory-lean loss (default 65536).
        intra_loss_weight: weight of the Eq. 5 term (1/(pi N)) sum theta_y (0 = off).
        inter_loss_weight: weight of the Eq. 6 term (0 = off; costs one extra (C, D) gradient tensor).
    Call: `loss = head(embeddings (B, D), labels (B,) int64)` -> scalar batch mean;
    `head.per_sample_loss(embeddings, labels, classifier_grad=True)` -> the (B,) rows of that mean (no Eq. 6).
    Attributes: `weight` (C, D) parameter, initialised N(0, 0.01^2); rows are normalised on the fly.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        margin_grad: str = "exact",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        intra_loss_weight: float = 0.0,
        inter_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = _check_size("num_classes", num_classes)
        self.embedding_size = _check_size("embedding_size", embedding_size)
        self.chunk_size = _check_size("chunk_size", chunk_size)
        if not (math.isfinite(float(s)) and s > 0):
            raise ValueError(f"scale s={s!r} must be a finite number > 0")
        check_margins(m1, m2, m3, margin_grad)
        for name, value in (("intra_loss_weight", intra_loss_weight), ("inter_loss_weight", inter_loss_weight)):
            if not (math.isfinite(float(value)) and value >= 0):
                raise ValueError(f"{name}={value!r} must be a finite number >= 0")
        if inter_loss_weight > 0 and num_classes < 2:
            raise ValueError(f"inter_loss_weight > 0 needs num_classes >= 2, got {num_classes}")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.margin_grad = margin_grad
        self.intra_loss_weight, self.inter_loss_weight = float(intra_loss_weight), float(inter_loss_weight)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        self.step_buffers = (ReusableBuffer(), ReusableBuffer())  # (B, C) logits, (C, D) grad W: reused across steps
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.01)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, s={self.s}, "
            f"m1={self.m1}, m2={self.m2}, m3={self.m3}, margin_grad={self.margin_grad!r}"
            + "".join(f", {k}={v}" for k, v in (("intra_loss_weight", self.intra_loss_weight),
                                                 ("inter_loss_weight", self.inter_loss_weight)) if v)
        )

    @property
    def batch_level_loss(self) -> bool:  # type: ignore[override]
        """True when the Eq. 6 inter-class regulariser (batch-level) is on (``ClassifierHead``)."""
        return self.inter_loss_weight > 0

    def _target(self, cos_y: Tensor) -> Tensor:
        return self.s * target_logit(cos_y, self.m1, self.m2, self.m3, self.margin_grad)  # s psi(theta_y)

    def _penalty(self, cos_y: Tensor) -> Tensor:
        return self.intra_loss_weight * intra_class_angle(cos_y)  # ArcFace Eq. 5 summand, weighted

    def per_sample_loss(self, embeddings: Tensor, labels: Tensor, *, classifier_grad: bool = True) -> Tensor:
        """(B,) per-row summand of ArcFace Eq. 4 (+ the weighted Eq. 5 term), whose batch mean is the loss.

        The batch-level Eq. 6 regulariser (`inter_loss_weight`) is not in it: `forward` adds that to the mean.
        classifier_grad=False holds `weight` fixed: no gradient reaches it, the embeddings (B, D) still get theirs.
        """
        labels = _check_inputs(embeddings, labels, self.num_classes, self.embedding_size)
        dtype = _compute_dtype(embeddings, self.weight)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x_hat = F.normalize(embeddings.to(dtype), dim=1)
            return chunked_margin_cross_entropy(
                x_hat,
                self.weight if classifier_grad else self.weight.detach(),
                labels,
                self._target,
                penalty_fn=self._penalty if self.intra_loss_weight > 0 else None,
                scale=self.s,
                normalize=True,
                chunk_size=self.chunk_size,
                buffers=self.step_buffers,
            )

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Scalar batch mean of ArcFace Eq. 4 (+ weighted Eq. 5 / Eq. 6 terms). embeddings (B, D), labels (B,)."""
        loss = self.per_sample_loss(embeddings, labels).mean()
        if self.inter_loss_weight > 0:
            dtype = _compute_dtype(embeddings, self.weight)
            with torch.autocast(device_type=embeddings.device.type, enabled=False):
                regularizer = inter_class_loss(self.weight.to(dtype), labels.long(), self.chunk_size)
            loss = loss + self.inter_loss_weight * regularizer
        return loss

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The full (B, C) margin-adjusted, scaled logits, plainly computed (for small C): s * apply_margin(cos)."""
        labels = _check_inputs(embeddings, labels, self.num_classes, self.embedding_size)
        dtype = _compute_dtype(embeddings, self.weight)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            weight = self.weight.to(dtype)
            cos = F.normalize(embeddings.to(dtype), dim=1) @ weight.t() / _row_norms(weight)
            return self.s * apply_margin(cos, labels, self.m1, self.m2, self.m3, self.margin_grad)


@HEADS.register("arcface")
class ArcFace(MarginSoftmax):
    """ArcFace: additive angular margin, s = 64, m2 = 0.5 rad (ArcFace Eq. 3)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5, **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, s=s, m1=1.0, m2=m, m3=0.0, **kwargs)


@HEADS.register("cosface")
class CosFace(MarginSoftmax):
    """CosFace: additive cosine margin, s = 64, m3 = 0.35."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.35, **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, s=s, m1=1.0, m2=0.0, m3=m, **kwargs)


@HEADS.register("sphereface")
class SphereFace(MarginSoftmax):
    """SphereFace in the arccos form of ArcFace Section 2.2: multiplicative margin m1 = 1.35, s = 64,
    continued monotonically where m1 theta > pi."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 1.35, **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, s=s, m1=m, m2=0.0, m3=0.0, **kwargs)


@HEADS.register("normface")
class NormFace(MarginSoftmax):
    """NormFace: normalised features and weights, scale s = 64, no margin (ArcFace Eq. 2)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, s=s, m1=1.0, m2=0.0, m3=0.0, **kwargs)


def _identity(q: Tensor) -> Tensor:
    return q


@HEADS.register("softmax")
class Softmax(nn.Module, ClassifierHead):
    """Plain softmax cross-entropy over a fully connected layer: logits = x W^T + b (ArcFace Eq. 1).

    No normalisation, scale or margin; same chunked, memory-lean loss as `MarginSoftmax`.
    Attributes: `weight` (C, D) and `bias` (C,), initialised like `nn.Linear`.
    """

    def __init__(self, num_classes: int, embedding_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__()
        self.num_classes = _check_size("num_classes", num_classes)
        self.embedding_size = _check_size("embedding_size", embedding_size)
        self.chunk_size = _check_size("chunk_size", chunk_size)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        self.bias = nn.Parameter(torch.empty(self.num_classes))
        self.step_buffers = (ReusableBuffer(), ReusableBuffer())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.embedding_size)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}"

    def per_sample_loss(self, embeddings: Tensor, labels: Tensor, *, classifier_grad: bool = True) -> Tensor:
        """(B,) per-row softmax cross-entropy (ArcFace Eq. 1 summand), whose batch mean is the loss.

        classifier_grad=False holds `weight` and `bias` fixed: no gradient reaches them, the embeddings still get
        theirs.
        """
        labels = _check_inputs(embeddings, labels, self.num_classes, self.embedding_size)
        weight, bias = (self.weight, self.bias) if classifier_grad else (self.weight.detach(), self.bias.detach())
        return chunked_margin_cross_entropy(
            embeddings, weight, labels, _identity, bias=bias, normalize=False, chunk_size=self.chunk_size,
            buffers=self.step_buffers,
        )

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Scalar batch mean of the softmax cross-entropy. embeddings (B, D), labels (B,) int64."""
        return self.per_sample_loss(embeddings, labels).mean()

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The full (B, C) logits x W^T + b (labels only checked: no margin)."""
        _check_inputs(embeddings, labels, self.num_classes, self.embedding_size)
        dtype = _compute_dtype(embeddings, self.weight)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return embeddings.to(dtype) @ self.weight.to(dtype).t() + self.bias.to(dtype)


__all__ = [
    "HEADS",
    "MARGIN_GRADS",
    "ArcFace",
    "CosFace",
    "MarginSoftmax",
    "NormFace",
    "Softmax",
    "SphereFace",
    "chunked_margin_cross_entropy",
]
