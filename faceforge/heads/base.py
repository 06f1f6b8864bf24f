"""What every head shares: the `HEADS` registry, the written contract between the trainer and a head,
and the helpers of the chunked kernels.

A head is an `nn.Module` called as ``loss = head(embeddings (B, D), labels (B,))`` that owns its class
proxies (pytorch-metric-learning's convention). `heads.build(name, **kwargs)` makes a registered one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from faceforge.core.registry import Registry
from faceforge.core.shards import RowShard  # the rows a rank holds: a checkpoint-format fact, in core

if TYPE_CHECKING:  # a type only: heads/ imports nothing of data/ or train/ at run time
    from faceforge.data.samplers import Batch

HEADS: Registry[nn.Module] = Registry("head")
# head name -> the factory of its own class-sharded form (``head.shard: true``), for the heads that are not
# sharded by ``heads.parallel.ShardedHead`` around them (BroadFace's queue, AttFC's container)
SHARDED_HEADS: Registry[nn.Module] = Registry("sharded head")


# ----------------------------------------------------------------------------------------------------------
# The contract between the trainer and a head (protocols)


@runtime_checkable
class ClassifierHead(Protocol):
    """What every classification head is (pytorch-metric-learning's base loss, in our words).

    - ``weight``: the class proxies W, (C, D) like ``nn.Linear`` (a property is fine); a head of K sub-centres a
      class (``subcentres = K``, Sub-center ArcFace) has (C, K, D): dim 0 is always the class;
    - ``head(embeddings (B, D), labels (B,) int64) -> loss``, a scalar: the mean over the batch of
      ``per_sample_loss`` plus any batch-level term of the head;
    - ``per_sample_loss(embeddings, labels, *, classifier_grad=True) -> (B,)``: each sample's loss; with
      ``classifier_grad=False`` the class side (W, a bias) is held fixed, so only the embeddings get a
      gradient (what a wrapper such as BroadFace needs for its Eq. 8).

    - ``observe_batch(embeddings, labels)``: the training batch once per forward, before any loss (a head that keeps
      statistics of the batch, AdaFace's norms); inherited as a no-op by subclassing;
    - ``batch_level_loss``: True when the loss adds a batch-level term to that mean (ArcFace's Eq. 6
      inter-class regulariser); a wrapper that recombines per-sample losses (BroadFace) refuses such a head.

    Checked with ``isinstance(head, ClassifierHead)`` (member names only: Python cannot check signatures).
    A head may subclass it (after ``nn.Module``) to inherit ``batch_level_loss = False``.
    """

    weight: Tensor
    batch_level_loss: bool = False

    def __call__(self, embeddings: Tensor, labels: Tensor) -> Tensor: ...

    def per_sample_loss(self, embeddings: Tensor, labels: Tensor, *, classifier_grad: bool = True) -> Tensor: ...

    def observe_batch(self, embeddings: Tensor, labels: Tensor) -> None:
        """The batch a training forward trains on (B, D), (B,), once, before its loss; a wrapper that calls
        ``per_sample_loss`` itself (BroadFace) calls this first. Default: nothing (``MarginHead.observe``)."""
        return None


class MarginContext(NamedTuple):
    """The per-sample facts a margin may depend on, beside the target cosine (the margin hook's second argument).

    norms: (B,) |x_b| of the embeddings as the backbone gave them (before normalisation), detached: AdaFace's
        and MagFace's margins depend on them (a margin is a function of the norm, not a path for its gradient);
    labels: (B,) int64 global class indices y_b;
    sample_ids: (B,) int64 view ids of the samples (``Batch.view_ids``: dataset index and flip; -1 unknown), or
        None when the caller named none (a head called directly): a margin drawn per sample (ElasticFace) keys
        its draw by them;
    target_cosines: (B,) cos(theta_{b y_b}) of EVERY row, detached, whatever shard holds its class (one all-reduce
        when the classes are sharded), filled only for a head with ``needs_target_cosines`` (CurricularFace's
        threshold and running mean, ElasticFace+'s ordering); else None;
    extras: {name: (B,) tensor}: per-sample quantities a head derives from the whole context in its ``prepare``
        hook (ElasticFace's drawn margins), taken with the rows like the rest; None when there are none.

    A strategy builds it once per forward over the rows it computes the loss of (the global batch when the
    classes are sharded, a block of BroadFace's queue) with :func:`margin_context`, lets the head ``prepare`` it,
    and hands the hook the rows whose target it computes (:meth:`take`). A head whose margin depends on the
    training step keeps the step itself through ``TrainHooks.after_optimizer_step``.
    """

    norms: Tensor
    labels: Tensor
    sample_ids: Tensor | None = None
    target_cosines: Tensor | None = None
    extras: dict[str, Tensor] | None = None

    def take(self, rows: Tensor | None) -> "MarginContext":
        """The context of ``rows`` (K,) of the batch (``target_rows``); itself for rows = None (every row)."""
        if rows is None:
            return self
        extras = None if self.extras is None else {name: value[rows] for name, value in self.extras.items()}
        return MarginContext(self.norms[rows], self.labels[rows], _take(self.sample_ids, rows),
                             _take(self.target_cosines, rows), extras)


def _take(values: Tensor | None, rows: Tensor) -> Tensor | None:
    return None if values is None else values[rows]


def margin_context(embeddings: Tensor, labels: Tensor, sample_ids: Tensor | None = None,
                   target_cosines: Tensor | None = None) -> MarginContext:
    """The :class:`MarginContext` of embeddings (B, D) (any norm), their global labels (B,), their sample ids (B,)
    (None: unknown) and the target cosines of every row (B,) (None: not asked for)."""
    if sample_ids is not None and sample_ids.shape != labels.shape:
        raise ValueError(f"sample_ids of shape {tuple(sample_ids.shape)}; expected one per sample, "
                         f"{tuple(labels.shape)}")
    return MarginContext(torch.linalg.vector_norm(embeddings.detach(), dim=1), labels, sample_ids, target_cosines)


class Reduction(Protocol):
    """How the per-sample terms of one set of class rows combine with those of the other rows (an execution
    strategy's side of the head's ``class_loss``): in one process every term is already whole (:data:`LOCAL`);
    class-sharded (``heads/parallel.py``), each is reduced over the ranks. All differentiable, (B,) -> (B,)."""

    def logsumexp(self, lse: Tensor) -> Tensor:
        """log sum over the row sets of exp(lse): the softmax family's non-target logsumexp."""
        ...

    def sum(self, values: Tensor) -> Tensor:
        """The sum over the row sets (the target logit lives in one set, 0 elsewhere; per-class binary terms)."""
        ...

    def replicated(self, param: Tensor) -> Tensor:
        """A parameter that every row set holds whole (SphereFace2's bias): its gradient summed over the sets."""
        ...


class _Local:
    """:class:`Reduction` of one process holding every class row: each term as it is."""

    def logsumexp(self, lse: Tensor) -> Tensor:
        return lse

    def sum(self, values: Tensor) -> Tensor:
        return values

    def replicated(self, param: Tensor) -> Tensor:
        return param


LOCAL: Reduction = _Local()

RowFill = Callable[[Tensor, 'torch.Generator | None'], None]  # fill(rows, generator) in place (None: the global one)


def normal_rows(std: float) -> RowFill:
    """A class-row init: N(0, std^2)."""

    def fill(rows: Tensor, generator: torch.Generator) -> None:
        rows.normal_(0.0, std, generator=generator)

    return fill


def uniform_rows(bound: float) -> RowFill:
    """A class-row init: U(-bound, bound) (``nn.Linear``'s)."""

    def fill(rows: Tensor, generator: torch.Generator) -> None:
        rows.uniform_(-bound, bound, generator=generator)

    return fill


@runtime_checkable
class ClassRows(Protocol):
    """A head whose class-indexed tensors an execution strategy may split by row (class sharding, Partial FC).

    - ``class_rows() -> {attribute: RowFill}``: the (C, ...) parameters indexed by class (``weight``, plain
      softmax's ``bias``) and how each is initialised, row by row (a strategy seeds row j by (seed, j));
    - ``class_loss(embeddings (N, D), labels (N,), *, local_labels=None, reduce=LOCAL, classifier_grad=True,
      rows=None) -> (N,)``: the per-sample loss of ``embeddings`` against the class rows this head holds, or
      against ``rows`` ({attribute: the selected rows}, Partial FC) in their place, with ``local_labels`` the row
      of each sample's class among them (-1: held elsewhere; default ``labels``), its per-sample terms combined
      with the other row sets' by ``reduce``. ``labels`` are the global classes and ``sample_ids`` (N,) the
      samples' view ids (None: unknown), the margin's context;
    - ``observe_batch(embeddings, labels, *, local_labels=None, reduce=LOCAL, sample_ids=None)``: once per
      training forward, the batch it trains on (the global batch when sharded, with this head's local labels and
      the strategy's reduction, so that a statistic of the target cosines is the same on every rank), before any
      loss: a head that keeps statistics of the batch (AdaFace's norm mean/std, CurricularFace's t) updates them
      here; the default does nothing.
    - ``sharded_refusal() -> str | None``: why the head cannot be split by class (ArcFace Eq. 6 needs every row at
      once), None if it can;
    - ``reset_shared(num_classes)``: initialise what is not a class row as a head of the whole run's C classes
      would (SphereFace2's balanced bias); a shard holds fewer rows than C.
    """

    def class_rows(self) -> dict[str, RowFill]: ...

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
    ) -> Tensor: ...

    def observe_batch(self, embeddings: Tensor, labels: Tensor, *, local_labels: Tensor | None = None,
                      reduce: Reduction = LOCAL, sample_ids: Tensor | None = None) -> None: ...

    def sharded_refusal(self) -> str | None: ...

    def reset_shared(self, num_classes: int) -> None: ...


@runtime_checkable
class TrainHooks(Protocol):
    """What a part (a head, an objective) may ask of the training loop. Opt in by subclassing::

        class MyHead(nn.Module, TrainHooks):
            def after_optimizer_step(self, step: int) -> None: ...

    and override only what the part needs; the others are the no-ops below. The trainer checks
    ``isinstance(part, TrainHooks)`` once, when it is built, and then calls, on every rank:

    - ``on_batch(batch)`` before each micro-batch's forward (``faceforge.data.samplers.Batch``: images,
      labels, sample ids, flip mask, extras);
    - ``after_optimizer_step(step)`` after each optimiser update; ``step`` = updates done (1 after the first);
    - ``diagnostics(embed_fn) -> {name: float}`` every ``train.diagnostics_every`` steps, on rank 0 only,
      when ``provides_diagnostics`` is True; ``embed_fn(view_ids (K,)) -> (K, D)`` embeds training images
      by :meth:`Batch.view_ids` with the current backbone;
    - ``extra_state() -> dict`` when a checkpoint is written (on every rank, so it may communicate; rank 0's
      result is saved) and ``load_extra_state(state)`` when one is read: state a part keeps outside its
      ``state_dict`` (tensors and plain containers only: checkpoints load with ``weights_only=True``);
    - ``verification_threshold() -> float | None``: a learned decision boundary in cosine terms
      (SphereFace2's bias), saved in the checkpoint for ``faceforge eval``; None = none;
    - ``row_shards() -> {state_dict key: RowShard}``: the part's tensors of which each rank holds its own rows
      (a class-sharded head's W). The trainer neither all-reduces their gradients nor counts them as replicated
      in the gradient norm (their squared norm is summed over ranks), and a checkpoint holds each as one logical
      tensor, with its optimiser state, written by the ranks that hold its rows. Default: none (a head's
      gradients are all-reduced (averaged) explicitly, as DDP does for the backbone).
    - ``use_optimizer(optimizer)``: once, when the trainer has built the optimiser that updates the part's
      parameters (a part whose rows are updated lazily keeps it to call ``LazyRows.catch_up``).

    Attributes:
        provides_diagnostics: the part's ``diagnostics`` means something (``train.diagnostics_every`` needs one).
    """

    provides_diagnostics: ClassVar[bool] = False

    def on_batch(self, batch: Batch) -> None:
        return None

    def after_optimizer_step(self, step: int) -> None:
        return None

    def diagnostics(self, embed_fn: Callable[[Tensor], Tensor]) -> dict[str, float]:
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    def verification_threshold(self) -> float | None:
        return None

    def row_shards(self) -> dict[str, RowShard]:
        return {}

    def use_optimizer(self, optimizer: Any) -> None:
        return None


class HeadKwargError(ValueError):
    """A head's keyword argument that does not fit the run: ``key`` is its name (``batch_size``), the message
    ``"<key>: <what is wrong, what was expected>"``; the trainer reports it as ``head.kwargs.<key>: ...``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class KwargRange(NamedTuple):
    """The documented range of one numeric head kwarg: low .. high, each end closed unless ``open_low`` /
    ``open_high``. A head declares its ranges as data beside its signature (``KWARG_RANGES``)."""

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False

    def holds(self, value: Any) -> bool:
        """Whether ``value`` is a real number (not a bool) inside the range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def describe(self) -> str:
        """``"a number in (0, 1024]"``."""
        return f"a number in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"


@runtime_checkable
class DeclaresRanges(Protocol):
    """A head factory that declares the documented range of its numeric kwargs (margins, scale) as data:
    ``KWARG_RANGES = {"s": KwargRange(0, 1024, open_low=True), "m": KwargRange(0, math.pi / 2)}``, checked once,
    by :func:`check_kwarg_ranges`, before the head is built."""

    KWARG_RANGES: ClassVar[dict[str, KwargRange]]


SCALE_RANGE = KwargRange(0.0, 1024.0, open_low=True)  # s: the feature scale (ArcFace 64, CosFace 30 to 64)
ANGULAR_MARGIN_RANGE = KwargRange(0.0, math.pi / 2)  # m2 (radians): ArcFace 0.5; a negative margin is a bonus
COSINE_MARGIN_RANGE = KwargRange(0.0, 1.0)  # m3: CosFace 0.35
MULTIPLICATIVE_MARGIN_RANGE = KwargRange(0.5, 8.0)  # m1: SphereFace 1.35, ArcFace Table 1 uses 0.9 with m2 = 0.4


def check_kwarg_ranges(factory: Any, kwargs: dict[str, Any], prefix: str = "") -> None:
    """Raise :class:`HeadKwargError` ``"<prefix><key>: <value>; expected a number in [a, b]"`` for the first kwarg
    outside the range the factory declares (:class:`DeclaresRanges`); a factory that declares none is not checked."""
    if not isinstance(factory, DeclaresRanges):
        return
    for key, allowed in factory.KWARG_RANGES.items():
        if key in kwargs and not allowed.holds(kwargs[key]):
            raise HeadKwargError(f"{prefix}{key}", f"{kwargs[key]!r}; expected {allowed.describe()}")


def require_in_ranges(ranges: dict[str, "KwargRange"], **values: Any) -> None:
    """Raise ValueError ``"<name>=<value>; expected a number in [a, b]"`` for the first of ``values`` outside its
    range in ``ranges`` (a head's ``KWARG_RANGES``), when the head is built directly rather than from a config."""
    for name, value in values.items():
        if not ranges[name].holds(value):
            raise ValueError(f"{name}={value!r}; expected {ranges[name].describe()}")


@runtime_checkable
class TakesRunFacts(Protocol):
    """A head factory that takes facts of the run as kwargs, so that users need not restate them:
    ``RUN_FACTS = {"batch_size": "global_batch"}`` maps a kwarg to a fact the trainer knows (``global_batch``:
    ``data.batch_size`` x world size; ``world_size``; ``seed``, the run's seed). The builder (``faceforge.build.build_head``) fills each
    kwarg the config leaves out; one the config sets is checked against the fact (``check_training``)."""

    RUN_FACTS: ClassVar[dict[str, str]]


def with_run_facts(factory: Any, kwargs: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the run facts the factory declares (:class:`TakesRunFacts`) filled where absent; a fact
    missing from ``facts`` (None) leaves the kwarg to its default."""
    if not isinstance(factory, TakesRunFacts):
        return dict(kwargs)
    filled = dict(kwargs)
    for key, fact in factory.RUN_FACTS.items():
        if key not in filled and facts.get(fact) is not None:
            filled[key] = facts[fact]
    return filled


@runtime_checkable
class TrainingCheck(Protocol):
    """A head factory (the registered class or function) that checks its kwargs against the run before any work:
    ``check_training(kwargs, num_classes=C, global_batch=B)``, with C the training identities and B the images
    one forward sees over all ranks (``data.batch_size`` x world size). It raises :class:`HeadKwargError` for a
    kwarg that cannot work (AttFC's ``batch_size`` must be B, its container a multiple of it); the trainer's
    preflight (``faceforge.train.preflight.check_head``) calls it before the head is built, once the data's
    class count and the world size are known. Optional: a factory without it is not checked."""

    def check_training(self, kwargs: dict[str, Any], *, num_classes: int, global_batch: int) -> None: ...


@runtime_checkable
class LazyRows(Protocol):
    """An optimiser that updates row-sparse gradients lazily (``faceforge.train.optim.LazyRowSGD``): a part that
    reads rows of such a parameter (Partial FC's sampled class rows) first brings them up to date with
    ``catch_up(param, rows (K,) int64)``, so that it sees what a dense optimiser would have left there."""

    def catch_up(self, param: Tensor, rows: Tensor) -> None: ...


@runtime_checkable
class HeadWrapper(Protocol):
    """A head that wraps another (BroadFace): ``head`` is the wrapped head, which holds the class weights;
    the wrapper's ``state_dict`` holds the wrapped head's entries as ``head.*`` beside its own. Starting a
    run from another run's class weights (``model.init_from``) loads into the wrapped head."""

    head: nn.Module


CLASSIFIER_MEMBERS = ("weight", "batch_level_loss", "per_sample_loss", "observe_batch")  # ClassifierHead's
TRAIN_HOOK_MEMBERS = ("on_batch", "after_optimizer_step", "diagnostics", "extra_state", "load_extra_state",
                      "verification_threshold", "row_shards", "use_optimizer", "provides_diagnostics")


def missing_classifier_member(head: object) -> str | None:
    """The first :class:`ClassifierHead` member ``head`` lacks (``CLASSIFIER_MEMBERS``); None when it has them all."""
    return next((name for name in CLASSIFIER_MEMBERS if not hasattr(head, name)), None)


def unopted_hooks(part: object) -> list[str]:
    """The :class:`TrainHooks` members that ``part``'s class defines without opting in (not a TrainHooks): the
    trainer would never call them. Empty for a part that opted in."""
    if isinstance(part, TrainHooks):
        return []
    return [name for name in TRAIN_HOOK_MEMBERS if any(name in vars(cls) for cls in type(part).__mro__[:-1])]


def train_hooks(*parts: object) -> list[TrainHooks]:
    """The parts that opted into :class:`TrainHooks`, in the order given (duplicates once)."""
    seen: set[int] = set()
    hooked: list[TrainHooks] = []
    for part in parts:
        if isinstance(part, TrainHooks) and id(part) not in seen:
            seen.add(id(part))
            hooked.append(part)
    return hooked


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
    """"auto" is "reuse" on CPU (fresh pages cost a kernel zeroing pass, benchmarks/RESULTS.md §1 and §14) and
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


def subcentre_target(x: Tensor, weight: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(cos_y (B,), rows (B,)) for class weights of K sub-centres a class, weight (C, K, D), x (B, D) unit-norm: the
    max over the target's sub-centres of cos(x_b, W_{y_b k}) (Sub-center ArcFace's class-wise max pooling) and the
    row y_b K + k* of the maximising sub-centre in ``weight.flatten(0, 1)`` (where its gradient goes)."""
    w_y = weight[labels].to(x.dtype)  # (B, K, D)
    cos = (w_y * x.unsqueeze(1)).sum(2) / torch.linalg.vector_norm(w_y, dim=2).clamp_min(torch.finfo(x.dtype).tiny)
    q, k = cos.max(1)
    return q, labels * weight.shape[1] + k


def class_row_of(rows: Tensor, reference: Tensor) -> Tensor:
    """The class row W_y (n, D) that stands for each of n samples' class: ``rows`` itself when they are (n, D); for a
    head of K sub-centres a class, rows (n, K, D), the sub-centre with the largest cosine to ``reference`` (n, D) (the
    sample's embedding: its sub-class-wise max; or a stored earlier copy of the row: the sub-centre it has become)."""
    if rows.dim() == 2:
        return rows
    unit = rows / torch.linalg.vector_norm(rows, dim=2, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
    nearest = (unit * reference.to(rows.dtype).unsqueeze(1)).sum(2).argmax(1)  # |reference| > 0 does not change it
    return rows[torch.arange(rows.shape[0], device=rows.device), nearest]


def target_rows(labels: Tensor) -> tuple[Tensor | None, Tensor]:
    """(rows (K,), their labels (K,)): the batch rows whose label is >= 0, i.e. whose target class is among the
    classes at hand (a label -1 marks a row whose class lives elsewhere, on another shard); rows = None when
    that is every row (then the labels are returned as they are)."""
    keep = labels >= 0
    if bool(keep.all()):
        return None, labels
    return keep.nonzero().squeeze(1), labels[keep]


def take_rows(values: Tensor, rows: Tensor | None) -> Tensor:
    """values[rows] along dim 0 (``values`` itself for rows = None: every row)."""
    return values if rows is None else values[rows]


def scatter_rows(values: Tensor, rows: Tensor | None, batch: int) -> Tensor:
    """(batch,) zeros with ``values`` (K,) at ``rows``; ``values`` itself for rows = None (every row)."""
    if rows is None:
        return values
    return values.new_zeros(batch).index_copy_(0, rows, values)


def add_target_grads(
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
        add_target_grads(grad_q, x[rows], weight, labels, normalize, x_rows, grad_w, grad_b)
        if grad_x is not None:
            grad_x.index_add_(0, rows, x_rows)
        return
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
