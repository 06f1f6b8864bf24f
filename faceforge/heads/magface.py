"""MagFace: a magnitude-aware margin and a magnitude regulariser (Meng et al., CVPR 2021).

    L_b = -log( e^{s cos(theta_y + m(a_b))} / (e^{s cos(theta_y + m(a_b))} + sum_{j != y} e^{s cos theta_j}) ) + lambda_g g(a_b)   Eq. 5
    a_b = clamp(|x_b|, l_a, u_a),  m(a) = (u_m - l_m) / (u_a - l_a) (a - l_a) + l_m,  g(a) = a / u_a^2 + 1 / a          Sec. 3.2

The embedding is NOT normalised before the head: its magnitude a is the quality score (the backbone's raw output).
Both the margin m(a) and the regulariser carry a gradient into a (the paper's Theorem 3.1 and the official
code: ``x_norm`` is not detached); the clamp stops it outside [l_a, u_a], as there.

The margin hook hands ``target_logit`` and ``loss_term`` the norms DETACHED (``heads.base.MarginContext``), and the
chunked kernel differentiates its target logit in the target cosine only. So the head adds the magnitude's own
gradient in ``class_loss``, per sample, on the rows whose target class it holds (reduced over the row sets like the
target logit, so a class-sharded run counts it once):

    lambda_g g(a_b) + dL_b/dt_b (t_b(a_b) - t_b(stop(a_b))),     dL_b/dt_b = -(1 - exp(-L_b)) = expm1(-L_b)

The second term is 0 in value; its gradient in a is dL/dt dt/da, the margin's path the kernel leaves out (first
order: a double backward would miss it). Hook change that would remove this: norms with a gradient in the context
and the kernel differentiating t and the loss term in them (the report of issue 29).

Past pi the target angle theta + m(a) is continued monotonically (``heads.margin.monotonic_cos``, as ArcFace here)
instead of the official linear fallback cos theta - m sin m. Defaults (the paper's implementation details and the official training script's arguments):
s = 64, l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, lambda_g = 35.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faceforge.heads.base import (
    HEADS,
    LOCAL,
    SCALE_RANGE,
    KwargRange,
    MarginContext,
    Reduction,
    check_buffer_policy,
    check_size,
    compute_dtype,
    require_in_ranges,
    scatter_rows,
    take_rows,
    target_rows,
)
from faceforge.heads.buffers import make_step_buffers
from faceforge.heads.margin import monotonic_cos, safe_acos
from faceforge.heads.softmax import DEFAULT_CHUNK_SIZE, MarginHead

MAGNITUDE_RANGE = KwargRange(0.0, 1e4, open_low=True)
MARGIN_RANGE = KwargRange(0.0, 1.5708)  # radians, as ArcFace's m
WEIGHT_RANGE = KwargRange(0.0, 1e4)


@HEADS.register("magface")
class MagFace(MarginHead):
    """MagFace (module docstring): s = 64, a in [l_a, u_a] = [10, 110], m(a) from l_m = 0.45 to u_m = 0.8,
    lambda_g = 35. Call: ``loss = head(embeddings (B, D) unnormalised, labels (B,))``."""

    norm_is_quality = True  # the magnitude a = |x| is the image's quality (deploy: Recognizer.quality)
    KWARG_RANGES = {"s": SCALE_RANGE, "l_a": MAGNITUDE_RANGE, "u_a": MAGNITUDE_RANGE, "l_m": MARGIN_RANGE,
                    "u_m": MARGIN_RANGE, "lambda_g": WEIGHT_RANGE}

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0,
                 l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 35.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 buffers: str = "auto") -> None:
        super().__init__()
        self.num_classes = check_size("num_classes", num_classes)
        self.embedding_size = check_size("embedding_size", embedding_size)
        self.chunk_size = check_size("chunk_size", chunk_size)
        require_in_ranges(self.KWARG_RANGES, s=s, l_a=l_a, u_a=u_a, l_m=l_m, u_m=u_m, lambda_g=lambda_g)
        if not l_a < u_a:
            raise ValueError(f"l_a={l_a!r} >= u_a={u_a!r}; expected l_a < u_a (the magnitude range)")
        self.scale, self.l_a, self.u_a = float(s), float(l_a), float(u_a)
        self.l_m, self.u_m, self.lambda_g = float(l_m), float(u_m), float(lambda_g)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        self.buffers = check_buffer_policy(buffers)
        self.step_buffers = make_step_buffers(buffers)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, s={self.scale}, "
                f"a in [{self.l_a}, {self.u_a}], m in [{self.l_m}, {self.u_m}], lambda_g={self.lambda_g}")

    def magnitude(self, norms: Tensor) -> Tensor:
        """a (K,): the embedding norms clamped to [l_a, u_a] (no gradient outside)."""
        return norms.clamp(self.l_a, self.u_a)

    def margin(self, a: Tensor) -> Tensor:
        """m(a) (K,), linear from l_m at l_a to u_m at u_a (radians)."""
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def regulariser(self, a: Tensor) -> Tensor:
        """lambda_g g(a) = lambda_g (a / u_a^2 + 1 / a) (K,)."""
        return self.lambda_g * (a / self.u_a**2 + 1.0 / a)

    def target_of(self, cos_y: Tensor, a: Tensor) -> Tensor:
        """s cos(theta_y + m(a)) (K,), continued monotonically past pi."""
        return self.scale * monotonic_cos(safe_acos(cos_y) + self.margin(a))

    def target_logit(self, cos_y: Tensor, context: MarginContext) -> Tensor:
        """The target logit at the detached magnitude (the kernel's part)."""
        return self.target_of(cos_y, self.magnitude(context.norms.to(cos_y.dtype)))

    def class_loss(self, embeddings: Tensor, labels: Tensor, *, local_labels: Tensor | None = None,
                   reduce: Reduction = LOCAL, classifier_grad: bool = True,
                   rows: dict[str, Tensor] | None = None, sample_ids: Tensor | None = None) -> Tensor:
        """(N,) the margin softmax (``MarginHead.class_loss``) plus the magnitude's terms (module docstring)."""
        loss = super().class_loss(embeddings, labels, local_labels=local_labels, reduce=reduce,
                                  classifier_grad=classifier_grad, rows=rows, sample_ids=sample_ids)
        here, local = target_rows(labels if local_labels is None else local_labels)
        weight = (rows or {}).get("weight", self.weight)
        dtype = compute_dtype(embeddings, weight)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = take_rows(embeddings.to(dtype), here)
            a = self.magnitude(torch.linalg.vector_norm(x, dim=1))
            cos_y = (F.normalize(x.detach(), dim=1) * F.normalize(weight.detach()[local].to(dtype), dim=1)).sum(1)
            margin_path = torch.expm1(-take_rows(loss.detach(), here).to(dtype)) * (
                self.target_of(cos_y, a) - self.target_of(cos_y, a.detach()))
            terms = scatter_rows(self.regulariser(a) + margin_path, here, embeddings.shape[0])
        return loss + reduce.sum(terms)
