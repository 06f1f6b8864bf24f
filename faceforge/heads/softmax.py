"""Margin-softmax heads over a full class-weight matrix, computed in class chunks (ArcFace Eq. 4).

    L = (1/N) sum_b [ log(exp(t_b) + sum_{j != y_b} exp(z_bj)) - t_b ] = (1/N) sum_b log1p(sum_{j != y_b} exp(z_bj - t_b))
    z_bj = s cos(theta_bj) = s <x_b/|x_b|, W_j/|W_j|>,    t_b = s psi(theta_{b y_b})     (margin.py)

The loss is one `torch.autograd.Function` (`_ChunkedMarginCE`) with a hand-written backward. Its chunks are
cache-sized (4096 classes: a (B, chunk) block of 2 MiB at B = 128), so every elementwise pass after a
chunk's matrix product reads the cache, not memory:

- forward, ONE sweep over the classes: per chunk, z = (s x_hat) W_c^T into the chunk's contiguous block of ONE
  (B, C) buffer (the scale folded into x once), |W_j| of the chunk's rows (just read by the product; kept:
  norms are computed once per step and reused by backward), z /= |W_j|, the target column to -inf, and the
  chunk's row max m_k and sum of exp(z - m_k) (an online logsumexp: the chunks are combined at the end). The
  buffer keeps z for backward (no recompute of the matrix product).
- the loss is softplus(lse_neg - t) = log1p(sum_{j != y} exp(z_j - t)), lse_neg the logsumexp of the
  non-target logits: exact at tiny losses, where lse - t in float32 would cancel two numbers near s.
- backward, one sweep: per chunk p = exp(z - lse_neg) (the non-target softmax, 0 at the target), the radial
  sums rho_j = sum_b g_b p_bj z_bj from that block, grad x += (p s/|W_j|) W_c, and grad W_c written ONCE by
  `torch.mm(out=grad_W[c0:c1])` (no read of old content), then its row-normalisation term
  - (rho_j / |W_j|^2) W_j added while the block is still in cache
  (d cos_bj / d W_j = x_hat_b / |W_j| - cos_bj W_j / |W_j|^2).
- the (B, C) buffer and grad W come from the head's `ReusableBuffer`s (buffers.py): `buffers="reuse"` keeps
  them between steps (a CPU training loop then pays no kernel zeroing of 2 GB of fresh pages every step),
  `"release"` keeps nothing; `"auto"` (default) is reuse on CPU, release on GPU.
- the target cosine cos_y (B,) is computed inside too, and its gradient (through the margin, exact or
  straight-through, and the optional Eq. 5 term) comes from autograd of the small (B,) function psi, then is
  scattered into grad W with `index_put_(accumulate=True)`. So W has a single gradient tensor: extra memory is the (B, C)
  buffer plus grad W, i.e. (1 + B/D) |W| (1.25 |W| for B = 128, D = 512).
- a per-sample transform of the non-target logits (``MarginHead.nontarget_logits``, CurricularFace): the buffer
  then keeps the plain cosines c (targets included, the scale not folded into x); each chunk's logits f(c) go to a
  chunk-sized temporary, its target cells -inf, before its max and sum; backward recomputes f(c) and f'(c) per chunk
  and takes p f' as dL/dc (its target cells 0). Memory as above plus (B, chunk) temporaries; a head without a
  transform runs exactly the passes above (no branch per element, nothing recomputed).

Sub-centres (``subcentres = K``, weight (C, K, D), Sub-center ArcFace): a chunk's (B, n K) cosines go into one
cache-sized workspace and are reduced by max into its (B, n) block; the argmax is kept in a chunk-major (B, C) uint8
buffer, and the backward spreads each (B, n) entry to its argmax column of (B, n K) before the same products (W viewed
as (C K, D)). cos_y is the max over the target's sub-centres; its gradient goes to that one (``base.subcentre_target``).

Logits, logsumexp and softmax are float32 (or float64 when W is) whatever autocast says; under CUDA the
loop allocates nothing per chunk beyond (B,)-sized index temporaries (workspaces are made once per call).
`head.logits(...)` is the plain (B, C) formulation, for small C and for checking.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faceforge.heads.base import (
    ANGULAR_MARGIN_RANGE,
    COSINE_MARGIN_RANGE,
    HEADS,
    LOCAL,
    MULTIPLICATIVE_MARGIN_RANGE,
    SCALE_RANGE,
    ClassifierHead,
    MarginContext,
    Reduction,
    RowFill,
    add_target_grads,
    check_buffer_policy,
    check_inputs,
    check_size,
    chunk_rows,
    chunks,
    compute_dtype,
    margin_context,
    normal_rows,
    row_norms,
    scatter_rows,
    softplus,
    subcentre_target,
    take_rows,
    target_input,
    target_rows,
    uniform_rows,
)
from faceforge.heads.buffers import ReusableBuffer, make_step_buffers
from faceforge.heads.margin import MARGIN_GRADS, apply_margin, check_margins, target_logit
from faceforge.heads.regularizers import inter_class_loss, intra_class_angle

DEFAULT_CHUNK_SIZE = 4096  # classes per block: a (B, 4096) float32 block (2 MiB at B = 128) stays in cache

TargetFn = Callable[[Tensor], Tensor]
# a per-sample transform of the non-target logits (MarginHead.nontarget_logits): (logits, d logits / d input), each
# mapping one (B, n) block of the kernel's inputs (cosines, or plain logits when not normalising) to (B, n)
NonTarget = tuple[TargetFn, TargetFn]


# ----------------------------------------------------------------------------------------------------------
# the chunked cross-entropy


def _target_positions(
    labels: Tensor, rows: Tensor | None, batch: int, num_classes: int, chunk_size: int
) -> Tensor:
    """(K,) where the target logits of `rows` (None: every row) live in the chunk-major buffer: chunk [c0, c1)
    is one contiguous (B, c1 - c0) block starting at B * c0, so row b's column y sits at B c0 + b (c1 - c0) + y - c0."""
    c0 = labels.div(chunk_size, rounding_mode="floor") * chunk_size
    width = (num_classes - c0).clamp_max(chunk_size)
    if rows is None:
        rows = torch.arange(batch, device=labels.device)
    return batch * c0 + rows * width + (labels - c0)


def subcentre_index_dtype(subcentres: int) -> torch.dtype:
    """The compact dtype of the kept argmax over K sub-centres: uint8 for K <= 256 (a (B, C) buffer of C bytes a
    row, 1/4 of the logits'), int32 beyond."""
    return torch.uint8 if subcentres <= 256 else torch.int32


class _SubcentrePool:
    """The sub-centre side of one forward of `_ChunkedMarginCE` (Sub-center ArcFace, the class-wise max pooling):
    per chunk the (B, n K) sub-centre logits in one cache-sized workspace, reduced by max over each class's K
    columns into the chunk's (B, n) block of the logit buffer; the argmax kept in ``argmax``, chunk-major like that
    buffer, (B C,) of ``subcentre_index_dtype(K)``, for the backward."""

    def __init__(self, batch: int, num_classes: int, width: int, subcentres: int, like: Tensor) -> None:
        self.batch, self.sub = batch, subcentres
        self.work = like.new_empty(batch * width * subcentres)
        self.running = like.new_empty(batch * width)  # the max over the first k sub-centres
        self.below = torch.empty(batch * width, dtype=torch.bool, device=like.device)
        self.argmax = torch.empty(batch * num_classes, dtype=subcentre_index_dtype(subcentres), device=like.device)

    def logits(self, n: int) -> Tensor:
        """(B, n K): the workspace of a chunk of n classes, class j's sub-centre k in column j K + k."""
        return self.work[: self.batch * n * self.sub].view(self.batch, n * self.sub)

    def reduce(self, sub_logits: Tensor, out: Tensor, c0: int, c1: int) -> None:
        """out (B, n) = max over k of sub_logits (B, n K); the argmax of classes [c0, c1) kept: the first maximiser,
        counted as the number of prefixes max_{k' <= k} below the max (elementwise passes: torch.max(dim) over a
        dimension of 3 is 2-3 times slower on CPU)."""
        n, batch = c1 - c0, self.batch
        v = sub_logits.view(batch, n, self.sub)
        out.copy_(v[..., 0])
        for k in range(1, self.sub):
            torch.maximum(out, v[..., k], out=out)
        index = self.argmax[batch * c0 : batch * c1].view(batch, n).zero_()
        running = self.running[: batch * n].view(batch, n).copy_(v[..., 0])
        below = self.below[: batch * n].view(batch, n)
        for k in range(self.sub - 1):
            if k:
                torch.maximum(running, v[..., k], out=running)
            index.add_(torch.lt(running, out, out=below).view(torch.uint8))


class _SubcentreSpread:
    """The sub-centre side of the backward: a chunk's (B, n) entries to their argmax sub-centre's column of
    (B, n K) (zeros elsewhere: max pooling routes the gradient to the maximum only), in two reused workspaces."""

    def __init__(self, batch: int, width: int, subcentres: int, like: Tensor, argmax: Tensor) -> None:
        self.batch, self.sub, self.argmax = batch, subcentres, argmax
        self.work = like.new_empty(2, batch * width * subcentres)
        self.index = torch.empty(batch * width, 1, dtype=torch.long, device=like.device)

    def spread(self, c0: int, c1: int, *values: Tensor) -> tuple[Tensor, ...]:
        """Each of ``values`` (B, n) (at most two) as (B, n K), for the classes [c0, c1)."""
        cells = self.batch * (c1 - c0)
        index = self.index[:cells].copy_(self.argmax[self.batch * c0 : self.batch * c1].unsqueeze(1))
        spread = []
        for slot, v in enumerate(values):
            out = self.work[slot, : cells * self.sub].view(cells, self.sub).zero_()
            spread.append(out.scatter_(1, index, v.reshape(cells, 1)).view(self.batch, (c1 - c0) * self.sub))
        return tuple(spread)


def _chunk_targets(labels: Tensor, rows: Tensor | None, c0: int, c1: int) -> tuple[Tensor, Tensor]:
    """(rows, columns) of the target cells inside the (B, c1 - c0) block of chunk [c0, c1): the rows (K,) and
    their labels (K,) as ``target_rows`` gives them (rows None: every row)."""
    inside = (labels >= c0) & (labels < c1)
    every = torch.arange(labels.shape[0], device=labels.device) if rows is None else rows
    return every[inside], labels[inside] - c0


class _ChunkedMarginCE(torch.autograd.Function):
    """(lse_neg (B,), t (B,), penalty (B,)), t_b = target_fn(q_b), penalty_b = penalty_fn(q_b) and
    lse_neg_b = log sum_{j != y_b} exp(z_bj), the logsumexp of the non-target logits. The per-sample loss
    (ArcFace Eq. 4's lse_b - t_b + penalty_b) is softplus(lse_neg_b - t_b) + penalty_b = log(1 + sum_{j != y}
    exp(z_j - t)) + penalty_b: exact when the loss is tiny, where lse_b - t_b would cancel two numbers near s.

    normalize=True:  z_bj = scale * x_b . W_j / |W_j| and q_b = x_b . W_y / |W_y| (x is already unit-norm).
    normalize=False: z_bj = x_b . W_j + bias_j         and q_b = z_{b y_b}   (plain softmax; scale unused).

    A label -1 means "the target class is not among these rows" (a class shard, parallel.py): that row's
    lse_neg runs over all its logits and its t_b and penalty_b are 0.

    subcentres = K: weight is (C, K, D) and every cosine (q_b too) is the max over a class's K sub-centres.

    nontarget = (f, f'): the non-target logits are f(c) of each (B, n) block c of unscaled cosines (plain logits
    when not normalising) instead of scale * c. The buffer then keeps c (targets included) and backward recomputes
    f and f' per block (no extra (B, C) memory; (B, n) temporaries; the elementwise work of f and f', those heads only).
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
        subcentres: int | None = None,
        nontarget: NonTarget | None = None,
    ) -> Tensor:
        batch, num_classes = x.shape[0], weight.shape[0]
        dtype = x.dtype
        spans = chunks(num_classes, chunk_size)
        width = spans[0][1]
        sub = 1 if subcentres is None else subcentres  # K rows of W per class (sub-center ArcFace): (C, K, D)
        rows_w = weight if subcentres is None else weight.flatten(0, 1)  # (C K, D): class c's rows [c K, (c + 1) K)
        pool = None if subcentres is None else _SubcentrePool(batch, num_classes, width, sub, x)
        # the chunk-major (B, C) logit buffer: each chunk's (B, c1 - c0) block is contiguous
        flat = buffers[0].get((batch * num_classes,), x) if buffers else x.new_empty(batch * num_classes)
        # the scale folded into x once: z = (s x) . W_j / |W_j|; a non-target transform reads the plain cosines
        x_scaled = x * scale if (normalize and nontarget is None) else x
        norms = x.new_empty(num_classes * sub) if normalize else None  # |W_j|, once per step, reused by backward
        chunk_max = x.new_empty(len(spans), batch)  # m_kb: row max of chunk k (target excluded)
        chunk_sum = x.new_empty(len(spans), batch)  # sum_{j in chunk k, j != y_b} exp(z_bj - m_kb)
        work = x.new_empty(batch * width)  # exp(z - m) of one chunk, cache-sized
        ones = x.new_ones(width)  # row sums as matrix-vector products (faster than sum(1) on CPU)
        rows_ws = None if weight.dtype == dtype else x.new_empty(width * sub, weight.shape[-1])
        bias_c = None if bias is None else bias.to(dtype)
        rows, labels = target_rows(labels)  # the rows whose target class is here (all, unless a class shard)
        if pool is None:
            q = target_input(take_rows(x, rows), weight, bias, labels, normalize)
        else:  # cos_y = the max over the target's sub-centres; its gradient goes to that row (labels: flat rows)
            q, labels = subcentre_target(take_rows(x, rows), weight, labels)
        target, penalty = _target_terms(q, target_fn, penalty_fn, grad=False)
        class_labels = labels if pool is None else labels.div(sub, rounding_mode="floor")
        positions = _target_positions(class_labels, rows, batch, num_classes, chunk_size)
        neg_inf = x.new_full((), -math.inf)
        tiny = torch.finfo(dtype).tiny
        for k, (c0, c1) in enumerate(spans):  # one sweep: each chunk's logits, max and sum while in cache
            n = c1 - c0
            w_c = chunk_rows(rows_w, c0 * sub, c1 * sub, dtype, rows_ws)
            z = flat[batch * c0 : batch * c1].view(batch, n)
            zs = z if pool is None else pool.logits(n)  # (B, n K) with sub-centres
            torch.mm(x_scaled, w_c.t(), out=zs)
            if normalize:
                norm_c = torch.linalg.vector_norm(w_c, dim=1, out=norms[c0 * sub : c1 * sub]).clamp_min_(tiny)
                zs.div_(norm_c)  # s cos(theta_bj)
            elif bias_c is not None:
                z.add_(bias_c[c0:c1])
            if pool is not None:
                pool.reduce(zs, z, c0, c1)  # z_bj = max_k of the class's K sub-centre logits; the argmax kept
            if nontarget is not None:  # z keeps the cosines; the transformed block, its target cells -inf
                z = nontarget[0](z).index_put_(_chunk_targets(class_labels, rows, c0, c1), neg_inf)
            else:
                # every row's own target column to -inf (a row whose target lies in an earlier chunk writes its
                # -inf again, one in a later chunk is overwritten by that chunk's matrix product)
                flat.index_put_((positions,), neg_inf)
            m = torch.amax(z, dim=1, out=chunk_max[k]).nan_to_num_(neginf=0.0)  # a row of only -inf: shift 0
            e = torch.sub(z, m.unsqueeze(1), out=work[: batch * n].view(batch, n)).exp_()
            torch.mv(e, ones[:n], out=chunk_sum[k])
        if nontarget is None:  # the target entries to the lowest finite number: exp(it - lse) = 0, 0 * it = 0
            flat.index_put_((positions,), x.new_full((), torch.finfo(dtype).min))
        lse_neg = torch.logsumexp(chunk_sum.log_().add_(chunk_max), dim=0)  # online logsumexp, combined
        ctx.save_for_backward(x, weight, bias, labels, flat, lse_neg, norms, q,
                              None if pool is None else pool.argmax)
        ctx.rows, ctx.subcentres = rows, subcentres
        ctx.fns, ctx.nontarget = (target_fn, penalty_fn), nontarget
        ctx.scale, ctx.normalize, ctx.chunk_size, ctx.buffers = scale, normalize, chunk_size, buffers
        # lse_neg is returned as a copy: an output saved for backward would keep itself alive under saved-tensor hooks
        return lse_neg.clone(), scatter_rows(target, rows, batch), scatter_rows(penalty, rows, batch)

    @staticmethod
    def backward(ctx: Any, grad: Tensor, grad_target: Tensor, grad_penalty: Tensor):  # type: ignore[override]
        x, weight, bias, labels, flat, lse_neg, norms, q, argmax = ctx.saved_tensors
        rows, subcentres = ctx.rows, ctx.subcentres
        scale, normalize, chunk_size = ctx.scale, ctx.normalize, ctx.chunk_size
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        batch, num_classes = x.shape[0], weight.shape[0]
        dtype = x.dtype
        grad = grad.to(dtype)  # d L / d lse_neg_b

        # the target path: d L / d t_b and d L / d penalty_b come in as they are, then autograd through psi
        q_leaf = q.detach().requires_grad_(True)
        with torch.enable_grad():
            target_q, penalty = _target_terms(q_leaf, *ctx.fns, grad=True)
            outputs = [target_q] + ([penalty] if penalty.requires_grad else [])
            grads = [take_rows(grad_target.to(dtype), rows)]
            grads += [take_rows(grad_penalty.to(dtype), rows)] if penalty.requires_grad else []
            (grad_q,) = torch.autograd.grad(outputs, q_leaf, grads, allow_unused=True)
        if grad_q is None:  # the target logit does not depend on q (cannot happen for the presets)
            grad_q = torch.zeros_like(q)

        lse = lse_neg.unsqueeze(1)  # d lse_neg_b / d z_bj = exp(z_bj - lse_neg_b), j != y_b
        spans = chunks(num_classes, chunk_size)
        width = spans[0][1]
        sub = 1 if subcentres is None else subcentres
        rows_w = weight if subcentres is None else weight.flatten(0, 1)  # (C K, D)
        class_labels = labels if subcentres is None else labels.div(sub, rounding_mode="floor")
        spread = None if subcentres is None else _SubcentreSpread(batch, width, sub, x, argmax)
        # dL/dz_bj = grad_b p_bj: grad_b goes into x (for grad W) and into grad x's rows at the end
        x_row = x * grad.unsqueeze(1)
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = None  # every row is written by the chunk loop
        if need_w:
            grad_w = ctx.buffers[1].get(weight.shape, weight) if ctx.buffers else torch.empty_like(weight)
        grad_b = torch.empty_like(bias) if (need_b and bias is not None) else None
        nontarget = ctx.nontarget
        # d z_bj / d(x_b . W_j): s / |W_j|, or 1 / |W_j| times f' when the buffer holds the plain cosines
        col_scale = ((scale if nontarget is None else 1.0) / norms) if normalize else None
        inv_norm_sq = norms.square().reciprocal_() if normalize else None
        work = x.new_empty(batch * width)
        radial = x.new_empty(width * sub) if normalize else None
        rows_ws = None if weight.dtype == dtype else x.new_empty(width * sub, weight.shape[-1])
        grad_ws = None if (grad_w is None or grad_w.dtype == dtype) else x.new_empty(width * sub, weight.shape[-1])
        grad_w_rows = None if grad_w is None else (grad_w if subcentres is None else grad_w.flatten(0, 1))
        for c0, c1 in spans:
            n = c1 - c0
            r0, r1 = c0 * sub, c1 * sub  # the chunk's rows of W (its classes' sub-centres)
            z = flat[batch * c0 : batch * c1].view(batch, n)  # no transform: the targets hold the lowest finite number
            if nontarget is None:  # non-target softmax, 0 at the target
                p = torch.sub(z, lse, out=work[: batch * n].view(batch, n)).exp_()
            else:  # the softmax of f(z) times f'(z), 0 at the target (set last: f there may be anything)
                p = torch.sub(nontarget[0](z), lse, out=work[: batch * n].view(batch, n)).exp_()
                p.mul_(nontarget[1](z)).index_put_(_chunk_targets(class_labels, rows, c0, c1), x.new_zeros(()))
            w_c = chunk_rows(rows_w, r0, r1, dtype, rows_ws)
            if normalize:
                # rho_j = sum_b grad_b p_bj z_bj, for the row-normalisation term (the buffer is consumed here)
                pz = torch.mul(z, p, out=z)
                if spread is not None:  # each (B, n) entry to its argmax sub-centre's column of (B, n K), 0 elsewhere
                    p, pz = spread.spread(c0, c1, p, pz)
                rho = torch.mv(pz.t(), grad, out=radial[: r1 - r0])
                p.mul_(col_scale[r0:r1])  # dL/d(x_b . W_j) / grad_b
            if grad_x is not None:
                grad_x.addmm_(p, w_c)
            if grad_b is not None:
                torch.mv(p.t(), grad, out=grad_b[c0:c1])
            if grad_w is not None:
                out = grad_w_rows[r0:r1] if grad_ws is None else grad_ws[: r1 - r0]
                torch.mm(p.t(), x_row, out=out)  # written once (no read of its old content)
                if normalize:  # - (rho_j / |W_j|^2) W_j, while the block is still in cache
                    out.addcmul_(w_c, rho.mul_(inv_norm_sq[r0:r1]).neg_().unsqueeze(1))
                if grad_ws is not None:
                    grad_w_rows[r0:r1].copy_(out)
        if grad_x is not None:
            grad_x.mul_(grad.unsqueeze(1))
        add_target_grads(grad_q, x, rows_w, labels, normalize, grad_x, grad_w_rows, grad_b, rows=rows)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None


def _target_terms(q: Tensor, target_fn: TargetFn, penalty_fn: TargetFn | None, grad: bool) -> tuple[Tensor, Tensor]:
    with torch.set_grad_enabled(grad):
        target = target_fn(q)
        penalty = penalty_fn(q) if penalty_fn is not None else torch.zeros_like(q)
    return target, penalty


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
    subcentres: int | None = None,
    nontarget: NonTarget | None = None,
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
        chunk_size: classes per block (default 4096: a (B, chunk) block stays in cache).
        buffers: (logit buffer, gradient of W) kept between calls (buffers.py); None allocates both afresh.
        subcentres: K for a weight (C, K, D) of K sub-centres a class (Sub-center ArcFace): a class's cosine is the
            max over its sub-centres (cos_y too), and each gradient goes to the sub-centre that gave the max.
            None (default): weight (C, D).
        nontarget: (f, f'): the non-target logits are f(cos) (B, n) per block instead of scale * cos, f' its
            elementwise derivative (``MarginHead.nontarget_logits``); None (default): scale * cos, no extra work.
    Returns:
        (B,) loss_b = logsumexp_j z_bj (target column = t_b) - t_b + penalty_b, computed as
        log(1 + sum_{j != y_b} exp(z_bj - t_b)) + penalty_b (exact at tiny losses).
    """
    lse_neg, target, penalty = chunked_margin_terms(
        x, weight, labels, target_fn, bias=bias, penalty_fn=penalty_fn, scale=scale, normalize=normalize,
        chunk_size=chunk_size, buffers=buffers, subcentres=subcentres, nontarget=nontarget,
    )  # fmt: skip
    return softplus(lse_neg - target) + penalty  # ArcFace Eq. 4, per sample


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
    subcentres: int | None = None,
    nontarget: NonTarget | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The three terms (lse_neg, t, penalty), each (B,), of :func:`chunked_margin_cross_entropy`
    (loss = softplus(lse_neg - t) + penalty), differentiable separately: a class shard (parallel.py) reduces lse_neg
    across ranks as a logsumexp and t, penalty as sums. lse_neg is the logsumexp of the non-target logits of
    ``weight``'s rows (-inf if there are none). Arguments as there; a label -1 means the row's class is not among
    ``weight``'s rows (then t = penalty = 0). Computed by `_ChunkedMarginCE` in float32 (or float64) whatever
    autocast says."""
    check_subcentres(weight, subcentres, normalize)
    dtype = compute_dtype(x, weight)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _ChunkedMarginCE.apply(
            x.to(dtype), weight, bias, labels, target_fn, penalty_fn, float(scale), bool(normalize), int(chunk_size),
            buffers, subcentres, nontarget,
        )


def check_subcentres(weight: Tensor, subcentres: int | None, normalize: bool) -> None:
    """ValueError unless ``weight`` is (C, D) for subcentres None, or (C, K, D) for subcentres K >= 1 (cosines only)."""
    if subcentres is None:
        if weight.dim() != 2:
            raise ValueError(f"class weights of shape {tuple(weight.shape)}; expected (C, D) (subcentres None)")
        return
    if weight.dim() != 3 or weight.shape[1] != subcentres or not normalize:
        raise ValueError(f"class weights of shape {tuple(weight.shape)} with subcentres={subcentres} (normalize="
                         f"{normalize}); expected (C, {subcentres}, D) and normalised cosines")


# ----------------------------------------------------------------------------------------------------------
# the margin hook and the family's one loss


class MarginHead(nn.Module, ClassifierHead):
    """The margin-softmax family: a head is its class rows plus a public hook on the target logit.

        loss_b = log(1 + sum_{j != y_b} exp(z_bj - t_b)) + extra_b,     z_bj = scale cos(theta_bj)  (or x_b W_j + b_j)

    A head of the family sets ``num_classes``, ``embedding_size``, ``scale`` (s), ``weight`` (C, D) (and may set
    ``chunk_size``, ``step_buffers``), calls ``reset_parameters()``, and overrides only what its method changes:

    - ``target_logit(cos_y (K,), context: MarginContext) -> (K,)``: the SCALED target logit t_b (ArcFace:
      s cos(theta + m)); context holds each row's embedding norm and label (``heads.base.MarginContext``);
    - ``loss_term(cos_y, context) -> (K,)`` with ``has_loss_term = True``: a per-sample term outside the
      softmax (ArcFace Eq. 5's intra-class angle, MagFace's regulariser), added where the target lives;
    - ``observe(context)``: the whole batch's context once per training forward, before the loss (AdaFace's
      running norm statistics); default nothing;
    - ``needs_target_cosines = True``: the context carries ``target_cosines``, every row's detached cos theta_y
      (one all-reduce of (B,) when the classes are sharded), for a margin that depends on the batch's targets;
    - ``prepare(context) -> MarginContext``: per-sample quantities of ALL the call's rows derived once, before the
      rows whose target is here are taken (its ``extras``; ElasticFace's drawn margins); default the context;
    - ``observe_sample_ids(ids (B,))``: names the next forward's samples (a head that opts into
      ``TrainHooks.on_batch`` passes ``batch.view_ids()``); they reach the context's ``sample_ids``;
    - ``nontarget_logits(cos (N, n), context) -> (N, n)``: the SCALED non-target logits of a block of cosines,
      elementwise, per row (CurricularFace: s cos (t + cos) where cos > the row's threshold); ``context`` is that of
      EVERY row of the call (each row has non-target classes on every shard), not only the rows whose target is
      here; it returns a new tensor (the kernel writes into it). Default None: ``scale * cos`` (no extra work).
      ``nontarget_grad(cos, context)`` is its elementwise derivative in cos (default: autograd of
      ``nontarget_logits`` on the block; a head overrides it with the closed form for speed). Every strategy
      applies it block by block through ``class_loss``;
    - ``subcentres = K``: ``weight`` is (C, K, D), K sub-centres a class (Sub-center ArcFace): the kernel takes each
      class's cosine (and cos_y) as the max over its sub-centres and sends each gradient to the maximising one;
    - ``class_rows()``: the class-indexed tensors and their init (default ``weight`` ~ N(0, 0.01^2));
      ``normalized = False`` for plain logits x W^T + b (``Softmax``, with ``bias`` among its class rows);
    - ``batch_level_loss`` / ``batch_loss(labels)``: a term over the whole batch (ArcFace Eq. 6).

    Every execution strategy reaches the head through :meth:`class_loss` (one process: ``per_sample_loss``; the
    class-sharded FC and Partial FC: ``heads.parallel.ShardedHead``; BroadFace's queue: ``per_sample_loss`` or
    the sharded ``global_loss`` per block), so a head written against this hook in one file runs in all of them.
    """

    normalized: bool = True
    has_loss_term: bool = False
    needs_target_cosines: bool = False
    nontarget_logits: Callable[[Tensor, MarginContext], Tensor] | None = None  # a method in a head that has one
    chunk_size: int = DEFAULT_CHUNK_SIZE
    step_buffers: tuple[ReusableBuffer, ReusableBuffer] | None = None  # None: fresh per call (buffers.py)
    _pending_ids: Tensor | None = None  # observe_sample_ids, taken by the next forward
    subcentres: int | None = None  # K: ``weight`` is (C, K, D), a class's logit the max over its K sub-centres

    def target_logit(self, cos_y: Tensor, context: MarginContext) -> Tensor:
        """(K,) the scaled target logit of the target cosines cos_y (K,) (the plain target logit when not
        ``normalized``). Default: no margin, ``scale * cos_y``."""
        return self.scale * cos_y

    def loss_term(self, cos_y: Tensor, context: MarginContext) -> Tensor:
        """(K,) a per-sample term outside the softmax; read only when ``has_loss_term`` is True."""
        return torch.zeros_like(cos_y)

    def observe(self, context: MarginContext) -> None:
        """The context (B,) of the whole batch, once per training forward, before its loss. Default: nothing."""
        return None

    def nontarget_grad(self, cos: Tensor, context: MarginContext) -> Tensor:
        """(N, n) d nontarget_logits(cos, context) / d cos, elementwise, of a block of cosines (N, n); read only when
        ``nontarget_logits`` is set. Default: autograd of ``nontarget_logits`` on the block."""
        with torch.enable_grad():
            leaf = cos.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.nontarget_logits(leaf, context), leaf, torch.ones_like(leaf))
        return grad

    def prepare(self, context: MarginContext) -> MarginContext:
        """The context of every row of a call (N,), with what the head derives from all of them (``extras``),
        before the rows whose target is here are taken. Default: the context as it is."""
        return context

    def observe_sample_ids(self, sample_ids: Tensor) -> None:
        """Name the rows of the next forward: (B,) int64 view ids (``Batch.view_ids``)."""
        self._pending_ids = sample_ids

    def class_rows(self) -> dict[str, RowFill]:
        """{attribute: init}: the class-indexed tensors (``weight``, N(0, 0.01^2) row by row)."""
        return {"weight": normal_rows(0.01)}

    def batch_loss(self, labels: Tensor) -> Tensor | None:
        """A batch-level term added to the mean (``batch_level_loss``); None: none."""
        return None

    def sharded_refusal(self) -> str | None:
        """Why the head cannot be split by class; None: it can (a batch-level term needs every row at once)."""
        if self.batch_level_loss:
            return "its batch-level loss term needs every class row on one rank; expected it off with shard"
        return None

    def reset_shared(self, num_classes: int) -> None:
        """Nothing: every tensor of the family's presets is a class row."""
        return None

    def reset_parameters(self) -> None:
        """Every class row from its init (``class_rows``), from the global random generator."""
        with torch.no_grad():
            for name, fill in self.class_rows().items():
                fill(getattr(self, name), None)

    def observe_batch(self, embeddings: Tensor, labels: Tensor, *, local_labels: Tensor | None = None,
                      reduce: Reduction = LOCAL, sample_ids: Tensor | None = None) -> None:
        """``observe`` the batch's context when training (the strategies call this once per forward)."""
        if self.training:
            with torch.no_grad():
                self.observe(self.context_of(embeddings, labels, local_labels=local_labels, reduce=reduce,
                                             sample_ids=sample_ids))

    def context_of(self, embeddings: Tensor, labels: Tensor, *, local_labels: Tensor | None = None,
                   reduce: Reduction = LOCAL, rows: dict[str, Tensor] | None = None,
                   sample_ids: Tensor | None = None) -> MarginContext:
        """The :class:`MarginContext` of every row (N,) of embeddings (N, D) and global labels (N,): norms, labels,
        sample ids, the target cosines when ``needs_target_cosines`` (each row's from the rows here, ``rows`` in
        their place for Partial FC, then ``reduce.sum`` over the row sets), then ``prepare``."""
        cosines = None
        if self.needs_target_cosines:
            local = labels if local_labels is None else local_labels
            weight = (rows or {}).get("weight", self.weight).detach()
            bias = (rows or {}).get("bias", getattr(self, "bias", None))
            dtype = compute_dtype(embeddings, weight)
            with torch.no_grad(), torch.autocast(device_type=embeddings.device.type, enabled=False):
                x = embeddings.detach().to(dtype)
                here, targets = target_rows(local)
                x_in = F.normalize(take_rows(x, here), dim=1) if self.normalized else take_rows(x, here)
                if self.subcentres is not None:  # the max over the target's sub-centres, as the kernel's cos_y
                    q = subcentre_target(x_in, weight, targets)[0]
                else:
                    q = target_input(x_in, weight, None if bias is None else bias.detach(), targets, self.normalized)
                cosines = reduce.sum(scatter_rows(q, here, x.shape[0])).detach()  # every row's, on every rank
        return self.prepare(margin_context(embeddings, labels, sample_ids, cosines))

    def class_loss(
        self,
        embeddings: Tensor,
        labels: Tensor,
        *,
        local_labels: Tensor | None = None,
        reduce: Reduction = LOCAL,
        classifier_grad: bool = True,
        rows: dict[str, Tensor] | None = None,
        sample_ids: Tensor | None = None,
    ) -> Tensor:
        """(N,) softplus(LSE_neg - t) + extra per sample, each term reduced over the row sets by ``reduce``
        (``heads.base.ClassRows``). embeddings (N, D) any norm; labels (N,) global classes; sample_ids (N,) their
        view ids (None: unknown)."""
        local = labels if local_labels is None else local_labels
        tensors = {name: getattr(self, name) for name in self.class_rows()}
        tensors.update(rows or {})
        if not classifier_grad:
            tensors = {name: t.detach() for name, t in tensors.items()}
        dtype = compute_dtype(embeddings, tensors["weight"])
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = embeddings.to(dtype)
            every = self.context_of(x, labels, local_labels=local, reduce=reduce, rows=tensors, sample_ids=sample_ids)
            context = every.take(target_rows(local)[0])  # the rows whose target is here
            nontarget = None
            if self.nontarget_logits is not None:  # every row has non-target classes here: the context of all rows
                nontarget = (lambda cos: self.nontarget_logits(cos, every), lambda cos: self.nontarget_grad(cos, every))
            lse_neg, target, extra = chunked_margin_terms(
                F.normalize(x, dim=1) if self.normalized else x,
                tensors["weight"],
                local,
                lambda cos_y: self.target_logit(cos_y, context),
                bias=tensors.get("bias"),
                penalty_fn=(lambda cos_y: self.loss_term(cos_y, context)) if self.has_loss_term else None,
                scale=self.scale,
                normalize=self.normalized,
                chunk_size=self.chunk_size,
                buffers=self.step_buffers,
                subcentres=self.subcentres,
                nontarget=nontarget,
            )
            loss = softplus(reduce.logsumexp(lse_neg) - reduce.sum(target))  # ArcFace Eq. 4 (Eq. 1 unnormalised)
            return loss + reduce.sum(extra) if self.has_loss_term else loss

    def per_sample_loss(self, embeddings: Tensor, labels: Tensor, *, classifier_grad: bool = True) -> Tensor:
        """(B,) each sample's loss, the rows of the batch mean (no batch-level term). classifier_grad=False holds
        the class rows fixed: only the embeddings (B, D) get a gradient."""
        labels = check_inputs(embeddings, labels, self.num_classes, self.embedding_size)
        return self.class_loss(embeddings, labels, classifier_grad=classifier_grad)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Scalar: the batch mean of ``per_sample_loss`` (+ the batch-level term). embeddings (B, D), labels (B,)."""
        labels = check_inputs(embeddings, labels, self.num_classes, self.embedding_size)
        sample_ids, self._pending_ids = self._pending_ids, None
        self.observe_batch(embeddings, labels, sample_ids=sample_ids)
        loss = self.class_loss(embeddings, labels, sample_ids=sample_ids).mean()
        extra = self.batch_loss(labels) if self.batch_level_loss else None
        return loss if extra is None else loss + extra


# ----------------------------------------------------------------------------------------------------------
# the heads


@HEADS.register("margin_softmax")
class MarginSoftmax(MarginHead):
    """Combined-margin softmax head, ArcFace Eq. 4: target logit s (cos(m1 theta + m2) - m3), others s cos theta.

    Args:
        num_classes: C. embedding_size: D.
        s: feature scale (> 0). m1, m2, m3: margins (m1 > 0; m2 in radians).
        margin_grad: "exact" (autograd of the formula, default) or "detached" (straight-through, as
            insightface arcface_torch / OpenSphere).
        chunk_size: classes per block in the memory-lean loss (default 4096).
        intra_loss_weight: weight of the Eq. 5 term (1/(pi N)) sum theta_y (0 = off).
        inter_loss_weight: weight of the Eq. 6 term (0 = off; costs one extra (C, D) gradient tensor).
        buffers: "auto" (default: "reuse" on CPU, "release" on GPU), "reuse" (keep the (B, C) buffer and the
            gradient of W between steps: no fresh pages to zero) or "release" (keep nothing; buffers.py).
    Call: `loss = head(embeddings (B, D), labels (B,) int64)` -> scalar batch mean;
    `head.per_sample_loss(embeddings, labels, classifier_grad=True)` -> the (B,) rows of that mean (no Eq. 6).
    Attributes: `weight` (C, D) parameter, initialised N(0, 0.01^2); rows are normalised on the fly.
    Ranges (``KWARG_RANGES``, checked before a run builds the head): s in (0, 1024], m1 in [0.5, 8], m2 in
    [0, pi/2], m3 in [0, 1].
    """

    KWARG_RANGES = {"s": SCALE_RANGE, "m1": MULTIPLICATIVE_MARGIN_RANGE, "m2": ANGULAR_MARGIN_RANGE,
                    "m3": COSINE_MARGIN_RANGE}

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
        buffers: str = "auto",
    ) -> None:
        super().__init__()
        self.num_classes = check_size("num_classes", num_classes)
        self.embedding_size = check_size("embedding_size", embedding_size)
        self.chunk_size = check_size("chunk_size", chunk_size)
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
        self.buffers = check_buffer_policy(buffers)
        self.step_buffers = make_step_buffers(buffers)  # (B, C) logits, (C, D) grad W (buffers.py)
        self.reset_parameters()

    @property
    def scale(self) -> float:
        """s, the scale of the non-target cosines (the margin hook's ``scale``)."""
        return self.s

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

    @property
    def has_loss_term(self) -> bool:  # type: ignore[override]
        """True when the Eq. 5 intra-class term is on."""
        return self.intra_loss_weight > 0

    def target_logit(self, cos_y: Tensor, context: MarginContext) -> Tensor:
        """s psi(theta_y) = s (cos(m1 theta_y + m2) - m3) (ArcFace Eq. 4), (K,)."""
        return self.s * target_logit(cos_y, self.m1, self.m2, self.m3, self.margin_grad)

    def loss_term(self, cos_y: Tensor, context: MarginContext) -> Tensor:
        """The weighted ArcFace Eq. 5 summand theta_y / pi, (K,)."""
        return self.intra_loss_weight * intra_class_angle(cos_y)

    def sharded_refusal(self) -> str | None:
        if self.inter_loss_weight > 0:
            return "inter_loss_weight > 0 (ArcFace Eq. 6) needs every class weight on one rank; expected 0 with shard"
        return None

    def batch_loss(self, labels: Tensor) -> Tensor | None:
        """The weighted ArcFace Eq. 6 inter-class regulariser of the batch's classes."""
        dtype = compute_dtype(self.weight)
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            return self.inter_loss_weight * inter_class_loss(self.weight.to(dtype), labels.long(), self.chunk_size)

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The full (B, C) margin-adjusted, scaled logits, plainly computed (for small C): s * apply_margin(cos)."""
        labels = check_inputs(embeddings, labels, self.num_classes, self.embedding_size)
        dtype = compute_dtype(embeddings, self.weight)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            weight = self.weight.to(dtype)
            cos = F.normalize(embeddings.to(dtype), dim=1) @ weight.t() / row_norms(weight)
            return self.s * apply_margin(cos, labels, self.m1, self.m2, self.m3, self.margin_grad)


@HEADS.register("arcface")
class ArcFace(MarginSoftmax):
    """ArcFace: additive angular margin, s = 64, m2 = 0.5 rad (ArcFace Eq. 3)."""

    KWARG_RANGES = {"s": SCALE_RANGE, "m": ANGULAR_MARGIN_RANGE}

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5, **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, s=s, m1=1.0, m2=m, m3=0.0, **kwargs)


@HEADS.register("cosface")
class CosFace(MarginSoftmax):
    """CosFace: additive cosine margin, s = 64, m3 = 0.35."""

    KWARG_RANGES = {"s": SCALE_RANGE, "m": COSINE_MARGIN_RANGE}

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.35, **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, s=s, m1=1.0, m2=0.0, m3=m, **kwargs)


@HEADS.register("sphereface")
class SphereFace(MarginSoftmax):
    """SphereFace in the arccos form of ArcFace Section 2.2: multiplicative margin m1 = 1.35, s = 64,
    continued monotonically where m1 theta > pi."""

    KWARG_RANGES = {"s": SCALE_RANGE, "m": MULTIPLICATIVE_MARGIN_RANGE}

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 1.35, **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, s=s, m1=m, m2=0.0, m3=0.0, **kwargs)


@HEADS.register("normface")
class NormFace(MarginSoftmax):
    """NormFace: normalised features and weights, scale s = 64, no margin (ArcFace Eq. 2)."""

    KWARG_RANGES = {"s": SCALE_RANGE}

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, s=s, m1=1.0, m2=0.0, m3=0.0, **kwargs)


@HEADS.register("softmax")
class Softmax(MarginHead):
    """Plain softmax cross-entropy over a fully connected layer: logits = x W^T + b (ArcFace Eq. 1).

    No normalisation, scale or margin (the margin hook with ``normalized = False`` and the identity target);
    same chunked, memory-lean loss as `MarginSoftmax` (same `buffers` policy).
    Attributes: `weight` (C, D) and `bias` (C,), initialised like `nn.Linear`.
    """

    normalized = False
    scale = 1.0

    def __init__(
        self, num_classes: int, embedding_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE, buffers: str = "auto"
    ) -> None:
        super().__init__()
        self.num_classes = check_size("num_classes", num_classes)
        self.embedding_size = check_size("embedding_size", embedding_size)
        self.chunk_size = check_size("chunk_size", chunk_size)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        self.bias = nn.Parameter(torch.empty(self.num_classes))
        self.buffers = check_buffer_policy(buffers)
        self.step_buffers = make_step_buffers(buffers)
        self.reset_parameters()

    def class_rows(self) -> dict[str, RowFill]:
        """``weight`` and ``bias``, U(-1/sqrt(D), 1/sqrt(D)) like ``nn.Linear``."""
        bound = 1.0 / math.sqrt(self.embedding_size)
        return {"weight": uniform_rows(bound), "bias": uniform_rows(bound)}

    def target_logit(self, cos_y: Tensor, context: MarginContext) -> Tensor:
        """The plain target logit x_y W_y + b_y as it is (no margin)."""
        return cos_y

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}"

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The full (B, C) logits x W^T + b (labels only checked: no margin)."""
        check_inputs(embeddings, labels, self.num_classes, self.embedding_size)
        dtype = compute_dtype(embeddings, self.weight)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return embeddings.to(dtype) @ self.weight.to(dtype).t() + self.bias.to(dtype)


__all__ = [
    "HEADS",
    "MARGIN_GRADS",
    "ArcFace",
    "CosFace",
    "MarginHead",
    "MarginSoftmax",
    "NormFace",
    "Softmax",
    "SphereFace",
    "chunked_margin_cross_entropy",
]
