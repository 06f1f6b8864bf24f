"""SphereFace2 (Wen et al. 2022): K one-vs-all binary classifiers on the hypersphere, in class chunks.

    L_b = (lambda / r) softplus(-(r psi(cos theta_y) + b))
        + ((1 - lambda) / r) sum_{i != y} softplus(r (g(cos theta_i) + m_n) + b)          (Eq. 6)
    g(z) = 2 ((z + 1) / 2)^t - 1                                                         (Eq. 5)

cos theta_i = <x / |x|, W_i / |W_i|>; b is one learnable scalar shared by every class. The margin type
sets the target similarity psi and the negative margin m_n (OpenSphere's `magn_type`):

    "C" (Eq. 6)   psi = g(cos theta_y) - m               m_n = m
    "A"           psi = g(cos(min(theta_y + m, pi)))     m_n = 0
    "M"           psi = g(cos(min(m theta_y, pi)))       m_n = 0

`margin_grad="exact"` differentiates all of it; `"detached"` is OpenSphere's straight-through form: the
same values, but the gradient reaches cos only through r cos (g and the margin enter as constants).

The loss is a sum of per-class terms, so the head needs no softmax over classes. One
`torch.autograd.Function` (`_ChunkedSphereFace2`) walks the classes in chunks:

- forward computes cos, z = r (g(cos) + m_n) + b and softplus(z) chunk by chunk (through (B, chunk)
  workspaces, in float32 or float64 whatever autocast says), and writes into ONE (B, C) buffer the local
  derivative D_bj = d loss_b / d cos_bj / |W_j| of the negatives. That is all backward needs: grad x and
  grad W are two matrix products of D (times the incoming gradient) plus the row-normalisation term of W,
  whose sum_b D_bj cos_bj is also taken in forward (that sum assumes the same incoming gradient for every
  sample, as a batch mean gives; otherwise backward recomputes it from grad W, one more pass over W). The
  target column goes through a small (B,) autograd function, as in softmax.py, and is scattered into
  grad W with `index_put_(accumulate=True)`.
- the buffer and grad W are lent by the head's `ReusableBuffer`s (buffers.py). Extra memory is the
  (B, C) buffer plus grad W, (1 + B / D) |W|, as for the margin heads.

`head.logits(...)` is the plain (B, C) formulation, for small C and for checking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faceforge.heads.base import (
    HEADS,
    LOCAL,
    SCALE_RANGE,
    KwargRange,
    MarginContext,
    ClassifierHead,
    Reduction,
    RowFill,
    TrainHooks,
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
    take_rows,
    target_input,
    target_rows,
)
from faceforge.heads.buffers import ReusableBuffer, make_step_buffers
from faceforge.heads.margin import MARGIN_GRADS, check_margin_grad, safe_acos

DEFAULT_CHUNK_SIZE = 16384  # classes per block: three (B, 16384) float32 workspaces, 8 MiB each at B = 128


# ----------------------------------------------------------------------------------------------------------
# the similarity and its margins, as pure functions of the cosine


def similarity_adjustment(cos: Tensor, t: float) -> Tensor:
    """g(cos) = 2 ((cos + 1) / 2)^t - 1, SphereFace2 Eq. 5. Any shape; (cos + 1) / 2 is clamped at 0 so
    that a cosine rounded below -1 gives no NaN for a fractional t."""
    return 2.0 * ((cos + 1.0) * 0.5).clamp_min(0.0).pow(t) - 1.0


def _psi_cosine(cos_y: Tensor, m: float, t: float) -> Tensor:
    return similarity_adjustment(cos_y, t) - m  # SphereFace2 Eq. 6, target


def _psi_angular(cos_y: Tensor, m: float, t: float) -> Tensor:
    theta = (safe_acos(cos_y) + m).clamp_max(math.pi)
    return similarity_adjustment(torch.cos(theta), t)  # SphereFace2-A (appendix), target


def _psi_multiplicative(cos_y: Tensor, m: float, t: float) -> Tensor:
    theta = (m * safe_acos(cos_y)).clamp_max(math.pi)
    return similarity_adjustment(torch.cos(theta), t)  # SphereFace2-M (appendix), target


@dataclass(frozen=True)
class MarginType:
    """psi(cos_y, m, t): the target similarity; margin_on_negatives: whether the negatives get + m."""

    psi: Callable[[Tensor, float, float], Tensor]
    margin_on_negatives: bool


MARGIN_TYPES: dict[str, MarginType] = {
    "C": MarginType(_psi_cosine, True),
    "A": MarginType(_psi_angular, False),
    "M": MarginType(_psi_multiplicative, False),
}


def _check_margin_type(margin_type: str) -> MarginType:
    if margin_type not in MARGIN_TYPES:
        raise ValueError(f"margin_type={margin_type!r}; expected one of {sorted(MARGIN_TYPES)}")
    return MARGIN_TYPES[margin_type]


def negative_margin(m: float, margin_type: str = "C") -> float:
    """m_n, the margin added to g(cos theta_i) of the negatives: m for "C", 0 for "A" and "M"."""
    return float(m) if _check_margin_type(margin_type).margin_on_negatives else 0.0


def target_similarity(
    cos_y: Tensor, m: float = 0.4, t: float = 3.0, margin_type: str = "C", margin_grad: str = "exact"
) -> Tensor:
    """psi(theta_y), the margined, adjusted similarity of each sample to its own class (before r and b).

    Args:
        cos_y: (B,) cosines to the own class centre.
        m: the margin (cosine units for "C", radians for "A", a factor for "M").
        t: the similarity-adjustment exponent of Eq. 5.
        margin_type: "C", "A" or "M" (module docstring). margin_grad: "exact" or "detached".
    Returns:
        (B,) psi, same dtype as `cos_y`; with "detached" its gradient with respect to cos_y is 1.
    """
    psi = _check_margin_type(margin_type).psi(cos_y, m, t)
    return MARGIN_GRADS[margin_grad](cos_y, psi)


def negative_similarity(
    cos: Tensor, m: float = 0.4, t: float = 3.0, margin_type: str = "C", margin_grad: str = "exact"
) -> Tensor:
    """g(cos theta_i) + m_n for the negatives, any shape; with "detached" its gradient w.r.t. cos is 1."""
    adjusted = similarity_adjustment(cos, t) + negative_margin(m, margin_type)
    return MARGIN_GRADS[margin_grad](cos, adjusted)


def balanced_bias(
    num_classes: int, lamb: float = 0.7, r: float = 30.0, m: float = 0.4, t: float = 3.0, margin_type: str = "C"
) -> float:
    """The initial b that balances the positive and negative gradients on b when every cos theta is 0.

    With a_y = r psi(0) and a_i = r (g(0) + m_n), d L / d b = 0 at cos = 0 reads
    lambda sigma(-(a_y + b)) = (1 - lambda)(C - 1) sigma(a_i + b), a quadratic in exp(b) whose positive
    root is (OpenSphere's closed form; z = lambda / ((1 - lambda)(C - 1)))

        b0 = log(2 z) - a_i - log(1 - z + sqrt((1 - z)^2 + 4 z exp(a_y - a_i)))

    C = 8631, lambda = 0.7, r = 40, m = 0.4, t = 3 give b0 = 5.78. Needs C >= 2 and 0 < lambda < 1.
    """
    if num_classes < 2:
        raise ValueError(f"bias_init='balanced' needs num_classes >= 2 (one negative at least); got {num_classes}")
    if not 0.0 < lamb < 1.0:
        raise ValueError(f"bias_init='balanced' needs 0 < lamb < 1; got lamb={lamb!r}")
    zero = torch.zeros(1, dtype=torch.float64, device="cpu")  # a number, even under torch.device("meta")
    a_y = r * float(target_similarity(zero, m, t, margin_type))
    a_i = r * float(negative_similarity(zero, m, t, margin_type))
    z = lamb / ((1.0 - lamb) * (num_classes - 1))
    root = 1.0 - z + math.sqrt((1.0 - z) ** 2 + 4.0 * z * math.exp(a_y - a_i))
    return math.log(2.0 * z) - a_i - math.log(root)


# ----------------------------------------------------------------------------------------------------------
# the chunked loss


@dataclass(frozen=True)
class _Settings:
    lamb: float
    r: float
    m: float
    t: float
    margin_type: str
    exact: bool  # margin_grad == "exact"
    positive: Callable[[Tensor], Tensor] | None = None  # cos_y (K,) -> r psi(cos_y) (K,); None: the formula's

    @property
    def m_n(self) -> float:
        return negative_margin(self.m, self.margin_type)

    def target_term(self, cos_y: Tensor, bias: Tensor) -> Tensor:
        """(lambda / r) softplus(-(r psi(cos_y) + b)), the positive summand of Eq. 6. (B,)."""
        if self.positive is not None:
            return (self.lamb / self.r) * softplus(-(self.positive(cos_y) + bias))
        psi = target_similarity(cos_y, self.m, self.t, self.margin_type, "exact" if self.exact else "detached")
        return (self.lamb / self.r) * softplus(-(self.r * psi + bias))


class _ChunkedSphereFace2(torch.autograd.Function):
    """Per-sample Eq. 6 (B,) of unit-norm x (B, D), weight (C, D) (rows normalised here) and bias (1,).

    A label -1 means the row's class is not among these rows (a class shard, parallel.py): every row is then
    a negative and the positive term is 0.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        labels: Tensor,
        settings: _Settings,
        chunk_size: int,
        buffers: tuple[ReusableBuffer, ReusableBuffer] | None,
    ) -> Tensor:
        s = settings
        batch, num_classes = x.shape[0], weight.shape[0]
        dtype = x.dtype
        b = bias.detach().to(dtype)
        shift = b + s.r * (s.m_n - 1.0)  # r (g(cos) + m_n) + b = 2 r u^t + shift, with u = (cos + 1) / 2
        deriv_scale = (1.0 - s.lamb) * (s.t if s.exact else 1.0)  # D = deriv_scale sigma(z) [u^(t-1)] / |W_j|
        deriv = buffers[0].get((batch, num_classes), x) if buffers else x.new_empty(batch, num_classes)
        norms, radial = x.new_empty(num_classes), x.new_empty(num_classes)
        width = min(chunk_size, num_classes)
        work_p, work_z, work_s = (x.new_empty(batch, width) for _ in range(3))
        softplus_sum, sigmoid_sum = x.new_zeros(batch), x.new_zeros(batch)
        zero, half = x.new_zeros(()), x.new_full((), 0.5)
        ones_b, ones_n = x.new_ones(batch), x.new_ones(width)  # sums as matrix-vector products (faster)
        rows_ws = None if weight.dtype == dtype else x.new_empty(width, weight.shape[1])  # a bf16 W, cast per chunk
        fractional_t = not s.t.is_integer()
        for c0, c1 in chunks(num_classes, chunk_size):
            n = c1 - c0
            w_c = chunk_rows(weight, c0, c1, dtype, rows_ws)
            u = deriv[:, c0:c1]  # the buffer holds u first, then D
            torch.mm(x, w_c.t(), out=u)
            norm_c = torch.linalg.vector_norm(w_c, dim=1, out=norms[c0:c1]).clamp_min_(torch.finfo(dtype).tiny)
            torch.addcmul(half, u, 0.5 / norm_c, out=u)  # u = (cos + 1) / 2
            if fractional_t:  # a cosine rounded below -1 would give NaN (an integer power of -1e-8 is harmless)
                u.clamp_min_(0.0)
            p = torch.pow(u, s.t - 1.0, out=work_p[:, :n])
            z = torch.addcmul(shift, p, u, value=2.0 * s.r, out=work_z[:, :n])  # SphereFace2 Eq. 5, 6
            _mask_targets(z, labels, c0, c1)  # the own class is no negative: softplus(-inf) = sigmoid(-inf) = 0
            sigma = torch.sigmoid(z, out=work_s[:, :n])
            sigmoid_sum.addmv_(sigma, ones_n[:n])
            softplus_sum.addmv_(torch.logaddexp(z, zero, out=z), ones_n[:n])  # softplus(z), overflow-free
            # d softplus(z) / d cos = sigma(z) r g'(cos), g'(cos) = t u^(t-1) (exact) or 1 (detached)
            slope = torch.mul(sigma, p, out=p) if s.exact else sigma
            coef = deriv_scale / norm_c
            # sum_b D_bj cos_bj with cos = 2 u - 1, for the row-normalisation term of grad W
            column = torch.mv(torch.mul(u, slope, out=z).t(), ones_b, out=radial[c0:c1])
            column.mul_(2.0).sub_(torch.mv(slope.t(), ones_b)).mul_(coef)
            torch.mul(slope, coef, out=u)  # D_bj = d loss_b / d cos_bj / |W_j|, (1 - lambda) / r folded in
        rows, labels = target_rows(labels)
        cos_y = target_input(take_rows(x, rows), weight, None, labels, True)
        positive = scatter_rows(s.target_term(cos_y, b), rows, batch)
        ctx.save_for_backward(x, weight, bias, labels, deriv, norms, radial, cos_y, sigmoid_sum)
        ctx.rows = rows
        ctx.settings, ctx.chunk_size, ctx.buffers = settings, chunk_size, buffers
        return positive + ((1.0 - s.lamb) / s.r) * softplus_sum  # SphereFace2 Eq. 6, per sample

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        x, weight, bias, labels, deriv, norms, radial, cos_y, sigmoid_sum = ctx.saved_tensors
        rows = ctx.rows
        s: _Settings = ctx.settings
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = x.dtype
        grad = grad.to(dtype)

        # the positive term: autograd of the small (B,) function of cos_y and b
        cos_leaf = cos_y.detach().requires_grad_(True)
        b_leaf = bias.detach().to(dtype).requires_grad_(True)
        with torch.enable_grad():
            grad_cos_y, grad_b_pos = torch.autograd.grad(
                s.target_term(cos_leaf, b_leaf), [cos_leaf, b_leaf], take_rows(grad, rows)
            )

        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = None
        if need_w:
            grad_w = ctx.buffers[1].get(weight.shape, weight) if ctx.buffers else torch.empty_like(weight)
        # a batch mean sends the same gradient g0 to every sample: then dL/dcos_bj / |W_j| = g0 D_bj, g0 goes
        # into the matrix products and the radial sums of forward apply as they are
        uniform = bool((grad == grad[0]).all())
        scale = float(grad[0]) if uniform else 1.0
        width = min(ctx.chunk_size, weight.shape[0])
        work = None if uniform else x.new_empty(x.shape[0], width)
        rows_ws = None if weight.dtype == dtype else x.new_empty(width, weight.shape[1])
        for c0, c1 in chunks(weight.shape[0], ctx.chunk_size):
            g_c = deriv[:, c0:c1] if uniform else torch.mul(deriv[:, c0:c1], grad.unsqueeze(1), out=work[:, : c1 - c0])
            w_c = chunk_rows(weight, c0, c1, dtype, rows_ws)
            if grad_x is not None:
                grad_x.addmm_(g_c, w_c, alpha=scale)  # sum_j dL/dcos_bj W_j / |W_j|
            if grad_w is not None:
                known = radial[c0:c1] * scale if uniform else None
                _weight_grad_into(g_c, scale, x, w_c, norms[c0:c1], known, grad_w[c0:c1])
        add_target_grads(grad_cos_y, x, weight, labels, True, grad_x, grad_w, None, rows=rows)
        grad_b = None
        if need_b:
            grad_neg = ((1.0 - s.lamb) / s.r) * (grad * sigmoid_sum).sum()
            grad_b = (grad_b_pos + grad_neg).to(bias.dtype).reshape(bias.shape)
        return grad_x, grad_w, grad_b, None, None, None, None


def _mask_targets(z: Tensor, labels: Tensor, c0: int, c1: int) -> None:
    """z[b, labels[b] - c0] = -inf for the rows whose label falls in the chunk's columns [c0, c1).

    Every row writes one entry (its own value back when its label is elsewhere): no host sync on a GPU."""
    rows = torch.arange(z.shape[0], device=z.device)
    cols = (labels - c0).clamp(0, z.shape[1] - 1)
    inside = (labels >= c0) & (labels < c1)
    z[rows, cols] = torch.where(inside, -math.inf, z[rows, cols])


def _weight_grad_into(
    g: Tensor, scale: float, x: Tensor, w_c: Tensor, norm_c: Tensor, radial: Tensor | None, out: Tensor
) -> None:
    """out = dL/dW_j = sum_b G_bj x_b - rho_j W_j / |W_j| for one chunk, G = scale g = dL/dcos_bj / |W_j| (B, n).

    rho_j = sum_b G_bj cos_bj: given as `radial`, or (for a non-uniform incoming gradient) computed as
    v_j . W_j / |W_j| from the first term v_j = sum_b G_bj x_b, since cos_bj = x_b . W_j / |W_j|.
    """
    if out.dtype == g.dtype:
        v = torch.addmm(out, g.t(), x, beta=0.0, alpha=scale, out=out)  # beta = 0: out's old content is ignored
    else:
        v = torch.mm(g.t(), x).mul_(scale)
    if radial is None:
        radial = torch.bmm(v.unsqueeze(1), w_c.unsqueeze(2)).reshape(-1) / norm_c
    v.addcmul_(w_c, (-radial / norm_c).unsqueeze(1))
    if v is not out:
        out.copy_(v)


def sphereface2_loss(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    labels: Tensor,
    *,
    lamb: float = 0.7,
    r: float = 30.0,
    m: float = 0.4,
    t: float = 3.0,
    margin_type: str = "C",
    margin_grad: str = "exact",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    buffers: tuple[ReusableBuffer, ReusableBuffer] | None = None,
    positive_logit: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Per-sample SphereFace2 loss (B,) (Eq. 6, without the loss weight), the classes processed in chunks.

    Args:
        x: (B, D) unit-norm embeddings (cast to float32, or float64 when x or W is).
        weight: (C, D) class weights; rows are normalised on the fly. bias: (1,) the shared bias b.
        labels: (B,) int64 in [0, C). lamb, r, m, t, margin_type, margin_grad: as `SphereFace2`.
        buffers: (the (B, C) derivative buffer, the gradient of W) kept between calls; None allocates both.
        positive_logit: the family's hook, target cosines (K,) of the rows whose class is among ``weight``'s ->
            r psi(cos_y) (K,), before the bias; None: the formula of m, t, margin_type, margin_grad.
    """
    dtype = compute_dtype(x, weight)
    settings = _Settings(float(lamb), float(r), float(m), float(t), margin_type, margin_grad == "exact",
                         positive_logit)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _ChunkedSphereFace2.apply(x.to(dtype), weight, bias, labels, settings, int(chunk_size), buffers)


# ----------------------------------------------------------------------------------------------------------
# the head


def _check_number(name: str, value: float, low: float, high: float = math.inf, *, open_low: bool = False) -> float:
    value = float(value)
    ok = math.isfinite(value) and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if math.isfinite(high) else "")
        raise ValueError(f"{name}={value!r} must be a finite number {bound}")
    return value


@HEADS.register("sphereface2")
class SphereFace2(nn.Module, ClassifierHead, TrainHooks):
    """SphereFace2: one binary classifier per class on the hypersphere, Eq. 6 with a shared learnable bias.

    Args:
        num_classes: C. embedding_size: D.
        lamb: lambda in [0, 1], the weight of the positive term (1 - lambda for the negatives). Default 0.7.
        r: the scale (> 0), radius of the hypersphere and curvature of the loss. Default 30.
        m: the margin (>= 0): cosine units for "C", radians for "A", a factor (> 0) for "M". Default 0.4.
        t: the similarity-adjustment exponent of Eq. 5 (>= 1; 1 turns it off). Default 3.
        loss_weight: multiplies the loss (OpenSphere's `lw`). Default 10, as in the paper's OpenSphere configs
            (`config/papers/SphereFace2`, SphereFace2-C/A/M); 1 trains ~10 points behind ArcFace at the same recipe.
        margin_type: "C" (Eq. 6, default), "A" (additive angular) or "M" (multiplicative), target only
            for "A" and "M"; theta is clamped at pi.
        margin_grad: "exact" (autograd of the formula, default) or "detached" (OpenSphere: g and the
            margin are constants, the gradient reaches cos through r cos only).
        chunk_size: classes per block (default 16384).
        bias_init: "balanced" (closed form balancing the gradients on b at cos = 0, `balanced_bias`) or a
            number.
        buffers: "auto" (default), "reuse" or "release": what is kept between steps, as for `MarginSoftmax`.
    Ranges (``KWARG_RANGES``, checked before a run builds the head): lamb in [0, 1], r in (0, 1024], m in [0, 4]
    (cosine units, radians or a factor by margin_type), t in [1, 16], loss_weight in [0, 1000].
    Call: `loss = head(embeddings (B, D), labels (B,) int64)` -> scalar batch mean.
    Attributes: `weight` (C, D), initialised N(0, 0.01^2), rows normalised on the fly; `bias` (1,).
    """

    KWARG_RANGES = {"lamb": KwargRange(0.0, 1.0), "r": SCALE_RANGE, "m": KwargRange(0.0, 4.0),
                    "t": KwargRange(1.0, 16.0), "loss_weight": KwargRange(0.0, 1000.0)}

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        lamb: float = 0.7,
        r: float = 30.0,
        m: float = 0.4,
        t: float = 3.0,
        loss_weight: float = 10.0,
        margin_type: str = "C",
        margin_grad: str = "exact",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        bias_init: str | float = "balanced",
        buffers: str = "auto",
    ) -> None:
        super().__init__()
        self.num_classes = check_size("num_classes", num_classes)
        self.embedding_size = check_size("embedding_size", embedding_size)
        self.chunk_size = check_size("chunk_size", chunk_size)
        self.lamb = _check_number("lamb", lamb, 0.0, 1.0)
        self.r = _check_number("r", r, 0.0, open_low=True)
        self.t = _check_number("t", t, 1.0)
        self.loss_weight = _check_number("loss_weight", loss_weight, 0.0)
        _check_margin_type(margin_type)
        self.m = _check_number("m", m, 0.0, open_low=margin_type == "M")
        check_margin_grad(margin_grad)
        if not (bias_init == "balanced" or (isinstance(bias_init, (int, float)) and not isinstance(bias_init, bool))):
            raise ValueError(f"bias_init={bias_init!r}; expected 'balanced' or a number")
        self.margin_type, self.margin_grad, self.bias_init = margin_type, margin_grad, bias_init
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        self.bias = nn.Parameter(torch.empty(1))
        self.buffers = check_buffer_policy(buffers)
        self.step_buffers = make_step_buffers(buffers)  # (B, C) derivatives, (C, D) grad W (buffers.py)
        self.reset_parameters()

    def initial_bias(self) -> float:
        """b at initialisation: `balanced_bias(...)` for bias_init="balanced", else the number given."""
        return self._initial_bias(self.num_classes)

    def _initial_bias(self, num_classes: int) -> float:
        if self.bias_init == "balanced":
            return balanced_bias(num_classes, self.lamb, self.r, self.m, self.t, self.margin_type)
        return _check_number("bias_init", self.bias_init, -math.inf)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.01)
        self.reset_shared(self.num_classes)

    # --- the class-row interface the execution strategies use (heads.base.ClassRows) ---

    def class_rows(self) -> dict[str, RowFill]:
        """``weight`` (C, D), N(0, 0.01^2) row by row; the bias b is shared by every class, not a class row."""
        return {"weight": normal_rows(0.01)}

    def reset_shared(self, num_classes: int) -> None:
        """b as for a head of ``num_classes`` classes (the balanced bias depends on C: a shard sets the whole run's)."""
        with torch.no_grad():
            self.bias.fill_(self._initial_bias(num_classes))

    def positive_logit(self, cos_y: Tensor, context: MarginContext) -> Tensor:
        """The binary family's margin hook: r psi(cos_y) (K,), the scaled, margined similarity of each row to its
        own class before the bias (SphereFace2 Eq. 6's positive; psi per ``margin_type``). A one-vs-all head with
        another margin overrides only this; ``context`` holds the rows' embedding norms and labels."""
        return self.r * target_similarity(cos_y, self.m, self.t, self.margin_type, self.margin_grad)

    def sharded_refusal(self) -> str | None:
        return None  # a sum of per-class terms: any split of the classes works (SphereFace2 Sec. 3.4)

    def observe_batch(self, embeddings: Tensor, labels: Tensor, *, local_labels: Tensor | None = None,
                      reduce: Reduction = LOCAL, sample_ids: Tensor | None = None) -> None:
        return None

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
        """loss_weight x Eq. 6 per sample (N,): this head's (or ``rows``'s) per-class terms summed over the row sets
        by ``reduce``; the shared bias is ``reduce.replicated`` (heads.base.ClassRows)."""
        local = labels if local_labels is None else local_labels
        weight = (rows or {}).get("weight", self.weight)
        weight, bias = (weight, self.bias) if classifier_grad else (weight.detach(), self.bias.detach())
        dtype = compute_dtype(embeddings, weight)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x_hat = F.normalize(embeddings.to(dtype), dim=1)
            context = margin_context(embeddings, labels, sample_ids).take(target_rows(local)[0])  # the rows whose class is here
            per_sample = sphereface2_loss(
                x_hat, weight, reduce.replicated(bias), local, lamb=self.lamb, r=self.r, m=self.m, t=self.t,
                margin_type=self.margin_type, margin_grad=self.margin_grad, chunk_size=self.chunk_size,
                buffers=self.step_buffers, positive_logit=lambda cos_y: self.positive_logit(cos_y, context),
            )  # fmt: skip
            return self.loss_weight * reduce.sum(per_sample)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, lamb={self.lamb}, r={self.r}, "
            f"m={self.m}, t={self.t}, loss_weight={self.loss_weight}, margin_type={self.margin_type!r}, "
            f"margin_grad={self.margin_grad!r}"
        )

    def per_sample_loss(self, embeddings: Tensor, labels: Tensor, *, classifier_grad: bool = True) -> Tensor:
        """loss_weight x the Eq. 6 summand of each sample, (N,); `forward` is its mean.

        Args:
            embeddings: (N, D), any norm. labels: (N,) integer class indices.
            classifier_grad: False holds `weight` and `bias` fixed: no gradient reaches them (the gradient
                still reaches the embeddings), as BroadFace's encoder step needs.
        """
        labels = check_inputs(embeddings, labels, self.num_classes, self.embedding_size)
        return self.class_loss(embeddings, labels, classifier_grad=classifier_grad)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Scalar: loss_weight x the batch mean of Eq. 6. embeddings (B, D), labels (B,) int64."""
        return self.per_sample_loss(embeddings, labels).mean()

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The plain (B, C) z = r psi(cos theta_y) + b in the label column, r (g(cos theta_i) + m_n) + b
        elsewhere (for small C and for checking). Eq. 6 is (lambda/r) softplus(-z_y) + ((1-lambda)/r) sum softplus(z_i).
        """
        labels = check_inputs(embeddings, labels, self.num_classes, self.embedding_size)
        dtype = compute_dtype(embeddings, self.weight)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            weight = self.weight.to(dtype)
            cos = F.normalize(embeddings.to(dtype), dim=1) @ weight.t() / row_norms(weight)
            index = labels.unsqueeze(1)
            args = (self.m, self.t, self.margin_type, self.margin_grad)
            psi = target_similarity(cos.gather(1, index).squeeze(1), *args)
            similarity = negative_similarity(cos, *args).scatter(1, index, psi.unsqueeze(1))
            return self.r * similarity + self.bias.to(dtype)

    def verification_threshold(self) -> float:
        """The learned universal threshold on cos theta: where r g(cos) + b = 0, i.e. g(cos) = -b / r,

            cos* = 2 ((1 - b / r) / 2)^(1 / t) - 1        (clamped to [-1, 1])

        the baseline decision boundary of Sec. 3.2, between the positive boundary r (g - m) + b = 0 and the
        negative one r (g + m) + b = 0 of "C" (for "A" and "M" it is the negatives' boundary). It is a
        threshold on the similarity of an embedding to a class centre; on pairs of embeddings it is an
        approximation.
        """
        level = (1.0 - float(self.bias.detach()) / self.r) / 2.0
        return 2.0 * min(max(level, 0.0), 1.0) ** (1.0 / self.t) - 1.0


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MARGIN_TYPES",
    "SphereFace2",
    "balanced_bias",
    "negative_similarity",
    "similarity_adjustment",
    "sphereface2_loss",
    "target_similarity",
]
