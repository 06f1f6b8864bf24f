"""What the accuracy harness runs, declared as data: the equal budgets, the datasets and the experiments.

A run's config is ``BASE[size]``, then ``DATASETS[dataset][size]`` (the ``data`` section), then the
experiment's overrides, then the variant's, then ``seed``: dotted ``key=value`` strings, exactly as on the
``faceforge train`` command line. Within one size every variant of every experiment shares the backbone,
data, steps, batch, optimiser and schedule; a variant changes only the head (and its kwargs) or, for the
label-noise experiment, ``data.label_noise``. The BroadFace experiments fine-tune: their runs start from
a table6 run's checkpoint (``Experiment.init_from``) and share their own budget (``FINETUNE``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SIZES = ("default", "many", "full")

# The equal budget of each size (everything but the head and the data section).
BASE: dict[str, dict[str, Any]] = {
    # 2-core CPU: a run trains in about 25 s (IResNet with one block per stage at quarter width, 32 px).
    "default": {
        "model": {"backbone": "iresnet", "embedding_size": 128, "kwargs": {"layers": [1, 1, 1, 1], "width": 0.25}},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "poly", "warmup_steps": 20},
        "train": {"steps": 160, "clip_grad_norm": 5.0, "log_every": 20, "checkpoint_every": 40, "progress": False},
    },
    # the many-class regime (issues 14 and 16): the default size's backbone and optimiser at 5,000 classes,
    # where a batch of 128 sees at most 2.6 % of the classes (the default size: a quarter). 200 steps of 128
    # = half an epoch of synthetic faces, a fifth of glyphs: each class is seen 5 times on average, the regime
    # where a class-container method (AttFC), Partial FC or a queue of past embeddings (BroadFace) matters.
    # A run trains in 60 (glyphs) to 100 s (synthetic) on one thread.
    "many": {
        "model": {"backbone": "iresnet", "embedding_size": 128, "kwargs": {"layers": [1, 1, 1, 1], "width": 0.25}},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "poly", "warmup_steps": 20},
        "train": {"steps": 200, "clip_grad_norm": 5.0, "log_every": 20, "checkpoint_every": 50, "progress": False},
    },
    # one GPU: IResNet-18 at 64 px, 40x the images of the default size.
    "full": {
        "model": {"backbone": "r18", "embedding_size": 256, "kwargs": {}},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "poly", "warmup_steps": 200},
        "train": {"steps": 3200, "clip_grad_norm": 5.0, "log_every": 100, "checkpoint_every": 500, "progress": False},
    },
}

# dataset -> size -> the data section. eval_pairs = 0: the harness scores its own gallery (gallery.py)
# after training; experiments with a learning curve turn the trainer's periodic evaluation on.
DATASETS: dict[str, dict[str, dict[str, Any]]] = {
    "synthetic": {
        "default": {
            "name": "synthetic", "num_identities": 500, "images_per_identity": 40, "image_size": 32,
            "difficulty": 0.7, "cache": True, "batch_size": 128, "eval_pairs": 0, "eval_identities": 300,
        },
        "many": {  # 5,000 identities x 10 images (50,000 images, 150 MB cached)
            "name": "synthetic", "num_identities": 5000, "images_per_identity": 10, "image_size": 32,
            "difficulty": 0.7, "cache": True, "batch_size": 128, "eval_pairs": 0, "eval_identities": 300,
        },
        "full": {
            "name": "synthetic", "num_identities": 5000, "images_per_identity": 40, "image_size": 64,
            "difficulty": 0.7, "cache": False, "batch_size": 256, "eval_pairs": 0, "eval_identities": 1000,
            "num_workers": 8,  # rendered on the fly: caching 200k images would re-render them for every run
        },
    },
    "glyphs": {
        "default": {
            "name": "glyphs", "path": "/usr/share/fonts", "num_identities": 500, "eval_identities": 200,
            "image_size": 32, "batch_size": 128, "eval_pairs": 0,
        },
        # 5,000 training characters x every kept font: the 27 fonts of the default size share 3,331 characters,
        # so fonts mapping < 0.35 x the best font's characters are dropped: 23 fonts (14 families) sharing 7,244
        "many": {
            "name": "glyphs", "path": "/usr/share/fonts", "num_identities": 5000, "eval_identities": 200,
            "image_size": 32, "batch_size": 128, "eval_pairs": 0, "glyph_min_coverage": 0.35,
        },
        "full": {
            "name": "glyphs", "path": "/usr/share/fonts", "num_identities": 2500, "eval_identities": 600,
            "image_size": 64, "glyph_variants": 2, "batch_size": 256, "eval_pairs": 0, "num_workers": 8,
        },
    },
}

# The held-out gallery of each size: images per synthetic test identity (glyphs use every test font) and
# the number of verification pairs sampled from it (half positive).
GALLERY: dict[str, dict[str, int]] = {
    "default": {"per_identity": 10, "pairs": 100_000},
    "many": {"per_identity": 10, "pairs": 100_000},
    "full": {"per_identity": 20, "pairs": 400_000},
}

# Trainer-side evaluation for learning curves: every N steps on this many pairs (train.log "eval step" lines).
# Default size: 1000 pairs (2000 test images embedded twice) cost about 2 s of one thread per evaluation.
CURVE: dict[str, dict[str, int]] = {
    "default": {"every": 40, "pairs": 1000},
    "many": {"every": 40, "pairs": 1000},
    "full": {"every": 200, "pairs": 6000},
}


# The report's default metric columns (Table 6 style) and BroadFace Table 5's retrieval columns.
VERIFICATION_COLUMNS = ("accuracy", "tar@far=1e-03", "tar@far=1e-04", "eer", "recall@1")
RETRIEVAL_COLUMNS = ("recall@1", "recall@10", "recall@20", "recall@30")


@dataclass(frozen=True)
class Variant:
    """One column of a paper's table: a label and its dotted overrides. ``x`` places it on a line plot's
    x axis within ``series`` (e.g. label-noise level within a head); None = a bar."""

    label: str
    overrides: tuple[str, ...]
    series: str | None = None
    x: float | None = None
    # the distillation teacher: (experiment, variant label) of a run of the same size, dataset and seed, whose
    # checkpoint becomes ``objective.kwargs.teacher`` (the harness runs it first and keeps its checkpoint)
    teacher: tuple[str, str] | None = None
    # unlabelled images for semi-supervised KD: this many, of identities that are neither trained nor tested,
    # written once per (dataset, seed) and given as ``data.unlabelled`` (gallery.UNLABELLED has the datasets)
    unlabelled: int = 0


@dataclass(frozen=True)
class Experiment:
    """A paper table or figure. ``variants`` and ``overrides`` may differ per size (a dict size -> tuple);
    ``curve`` records the trainer's verification every ``CURVE[size]["every"]`` steps for learning curves;
    ``init_from`` = (experiment, variant label) names the run whose checkpoint starts every run of this
    experiment (``model.init_from``; same size, dataset and seed): the harness runs it first if it is
    missing and keeps its checkpoint. ``columns`` are the report's metric columns (keys of
    ``gallery.evaluate_gallery``)."""

    title: str
    variants: tuple[Variant, ...] | dict[str, tuple[Variant, ...]]
    overrides: tuple[str, ...] | dict[str, tuple[str, ...]] = ()
    curve: bool = False
    x_label: str = ""
    init_from: tuple[str, str] | None = None
    columns: tuple[str, ...] = VERIFICATION_COLUMNS
    notes: str = field(default="", compare=False)
    # score the gallery a second time with one side of every pair masked (``masked/<metric>``; BigFace's MFR)
    masked: bool = False
    # score it again with the second side of every pair degraded (``degraded/<metric>``; ``faceforge eval --degraded``)
    degraded: bool = False
    # fit error = a x (x / 1M)^-b over the variants' x (parameters) and report b (BigFace's scaling law)
    power_law: bool = False
    # the datasets the experiment makes sense on (empty: every dataset asked for)
    datasets: tuple[str, ...] = ()

    def variants_for(self, size: str) -> tuple[Variant, ...]:
        """The variants at ``size``; none when the experiment is not declared at that size."""
        return self.variants.get(size, ()) if isinstance(self.variants, dict) else self.variants

    def overrides_for(self, size: str) -> tuple[str, ...]:
        return self.overrides.get(size, ()) if isinstance(self.overrides, dict) else self.overrides


def _flow(value: Any) -> str:
    """``value`` as YAML flow text: strings quoted, booleans lower-case, dicts as nested flow mappings."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def _head(name: str, **kwargs: Any) -> tuple[str, ...]:
    """``head.name=...`` and ``head.kwargs={...}`` overrides (kwargs as a YAML flow mapping)."""
    return (f"head.name={name}", f"head.kwargs={_flow(kwargs)}")


# The heads at the hyperparameters of their papers, scaled to a few hundred classes (s = 32 is ample
# for 500 classes: ArcFace's bound s >= (C-1)/C log((C-1) P / (1-P)) is 9 at P = 0.9).
SOFTMAX = _head("softmax")
COSFACE = _head("cosface", s=32.0, m=0.35)
ARCFACE = _head("arcface", s=32.0, m=0.5)
SPHEREFACE = _head("sphereface", s=32.0, m=1.35)
# SphereFace2 as in the paper (r = 30, m = 0.4 fixed, lambda = 0.7, t = 3; OpenSphere's lw = 10).
SF2 = {"lamb": 0.7, "r": 30.0, "m": 0.4, "t": 3.0, "loss_weight": 10.0}
SPHEREFACE2 = _head("sphereface2", **SF2)


NOISE_LEVELS = (0.0, 0.2, 0.4, 0.6)

# --------------------------------------------------------------------------------------------------
# BroadFace (issue 6): fine-tuning, as the paper does (Sec. 4.1: from a model trained with a softmax-type
# loss, lr 5e-3 / 5e-4 / 5e-5 for 50k / 20k / 10k steps). Every run of a BroadFace experiment starts from
# the table6 run of its dataset and seed (ArcFace; CosFace for Table 4) and fine-tunes for the same budget,
# the plain head (queue 0) included: lr 0.01 with the paper's step decay at 5/8 and 7/8 of the steps.
# Default size: 320 steps (2 to 3 epochs), the most that keeps the 54-run grid near 1.5 h of one thread.
FINETUNE: dict[str, tuple[str, ...]] = {
    "default": ("train.steps=320", "optim.lr=0.01", "schedule.name=step", "schedule.warmup_steps=0",
                "schedule.milestones=[200, 280]", "schedule.gamma=0.1"),
    # many-class regime: 120 steps, x 0.1 at 75 and 105 (5/8 and 7/8).
    "many": ("train.steps=120", "optim.lr=0.01", "schedule.name=step", "schedule.warmup_steps=0",
             "schedule.milestones=[75, 105]", "schedule.gamma=0.1"),
    "full": ("train.steps=2000", "optim.lr=0.01", "schedule.name=step", "schedule.warmup_steps=0",
             "schedule.milestones=[1250, 1750]", "schedule.gamma=0.1"),
}
# The many-class regime's longer fine-tune (broadface_long): 1,000 steps, x 0.1 at 625 and 875, so that the
# paper's 8,192-embedding queue (full from step 64) acts at full size for 94 % of the fine-tune, 560 steps of
# it at lr 0.01 (the 120-step fine-tune: 56 steps, 11 at lr 0.01).
FINETUNE_LONG: dict[str, tuple[str, ...]] = {
    "many": ("train.steps=1000", "optim.lr=0.01", "schedule.name=step", "schedule.warmup_steps=0",
             "schedule.milestones=[625, 875]", "schedule.gamma=0.1"),
}
# The queue sizes: 16, 64 and 256 iterations of 128 embeddings (the paper: 8192 = 64 iterations
# per GPU). On the default size a training epoch is 105 (glyphs) to 156 (synthetic) iterations, so the
# largest queue holds every training image once or twice; it fills at step 256 of 320.
QUEUES = (2048, 8192, 32768)
# BroadFace Fig. 5a: the queue's cosine error (train.diagnostics_every) every N steps.
DIAGNOSTICS_EVERY = {"default": 40, "many": 40, "full": 200}


def _broadface(size: str, queue: int, compensate: bool = True, inner: str = "arcface",
               **inner_kwargs: Any) -> tuple[str, ...]:
    """BroadFace(inner head) overrides, with the Fig. 5a diagnostics logged every DIAGNOSTICS_EVERY steps."""
    head = _head("broadface", queue_size=queue, compensate=compensate, head=inner, head_kwargs=inner_kwargs)
    return (*head, f"train.diagnostics_every={DIAGNOSTICS_EVERY[size]}")


def _arcface_queue(size: str, queue: int, compensate: bool) -> Variant:
    label = f"BroadFace q={queue}" + ("" if compensate else " no comp.")
    series = "compensated" if compensate else "not compensated"
    return Variant(label, _broadface(size, queue, compensate, s=32.0, m=0.5), series, queue)


# The fine-tuned plain ArcFace (queue 0): the baseline of Table 6a, Table 5 and Fig. 7b (x None: drawn as a
# horizontal line on the queue-size plot).
ARCFACE_FINETUNED = Variant("ArcFace", ARCFACE)


def _queue_variants(size: str) -> tuple[Variant, ...]:
    if size == "many":  # issue 16 section 5: Table 6a again where a batch sees 2.6 % of the classes. The paper's
        # 8192 (64 iterations) only: a 120-step fine-tune (15,360 embeddings) would never fill a 32k queue.
        return (ARCFACE_FINETUNED, _arcface_queue(size, QUEUES[1], True), _arcface_queue(size, QUEUES[1], False))
    return (ARCFACE_FINETUNED,) + tuple(_arcface_queue(size, q, c) for q in QUEUES for c in (True, False))


def _broadface_experiment(title: str, variants: dict[str, tuple[Variant, ...]],
                          init_from: tuple[str, str] = ("table6", "ArcFace"),
                          budget: dict[str, tuple[str, ...]] = FINETUNE, **kwargs: Any) -> Experiment:
    """A BroadFace experiment: the fine-tune ``budget`` (default FINETUNE) and a learning curve in every run, each
    run started from its dataset's and seed's ``init_from`` run. Experiments that list the same variants and
    budget share their runs."""
    return Experiment(title, variants, overrides=budget, curve=True, init_from=init_from, **kwargs)


# --------------------------------------------------------------------------------------------------
# AttFC (issue 14 section 3) and Partial FC (issue 16 section 5): declared at the many-class size only, where
# 5,000 classes meet a batch of 128. W-size is the number of class centres in the softmax of a step: C for the
# full FC, the container's S = floor(ratio C / B) B for AttFC (AttFC Table 2), and the sampled rows for Partial
# FC, whose rate is set so its W-size equals AttFC's at the same ratio (Table 2: "Partial FC-0.3 represents
# the same W-size as AttFC-0.3").
MANY_CLASSES = 5000
MANY_BATCH = 128
ATTFC_RATIOS = (0.1, 0.2, 0.3)
ATTFC_KS = (2, 3, 4, 5)
# gamma of AttFC Eq. 12. The paper's 0.999 is a 1,000-step time constant in a run of about 67,000 steps
# (MS1MV3, batch 384, 5 epochs): 1.5 % of the run. At 200 steps, 0.999 would leave the class encoder 82 % at
# its random initialisation; 0.9 (a 10-step time constant, 5 % of the run) keeps the lag a small fraction.
ATTFC_MOMENTUM = 0.9


def container_rows(ratio: float) -> int:
    """AttFC's S at the many-class size: floor(ratio C / B) B (the official code's rule)."""
    return int(ratio * MANY_CLASSES / MANY_BATCH) * MANY_BATCH


def _attfc(ratio: float, k: int = 2, weighting: str = "attention") -> tuple[str, ...]:
    """AttFC overrides: the head (ArcFace margin s 32, m 0.5, as the full FC), its objective (the momentum class
    encoder) and the sampler of k class images per sample."""
    return (*_head("attfc", ratio=ratio, batch_size=MANY_BATCH, s=32.0, m2=0.5, weighting=weighting),
            "objective.name=attfc", f"objective.kwargs={_flow({'momentum': ATTFC_MOMENTUM})}",
            "data.sampler=attfc", f"data.sampler_kwargs={_flow({'k': k})}")


def _partial_fc(rows: int) -> tuple[str, ...]:
    """Partial FC (ArcFace s 32, m 0.5) keeping ``rows`` of the 5,000 class rows per step: positives + negatives."""
    return (*ARCFACE, "head.shard=true", f"head.sample_rate={rows / MANY_CLASSES}")


FULL_FC = Variant(f"Full FC (W {MANY_CLASSES})", ARCFACE)
ATTFC = {r: Variant(f"AttFC-{r} (W {container_rows(r)})", _attfc(r)) for r in ATTFC_RATIOS}
PARTIAL_FC = {r: Variant(f"Partial FC-{r} (W {container_rows(r)})", _partial_fc(container_rows(r))) for r in (0.1, 0.3)}


# --------------------------------------------------------------------------------------------------
# BigFace (issue 15 section 5), at the default size: CosFace at BigFace's m = 0.4 (s = 32 as every head here:
# BigFace's s = 64 is for 2M classes), one budget, backbones from 0.11M to 1.36M parameters.
BIGFACE_COSFACE = _head("cosface", s=32.0, m=0.4)
# IResNet with one block per stage at these widths, 128-d at 32 px: width -> parameters (tests check them)
BACKBONE_WIDTHS = {0.125: 110_968, 0.1875: 223_620, 0.25: 374_512, 0.375: 791_016, 0.5: 1_360_480}


def _scaled(width: float) -> Variant:
    params = BACKBONE_WIDTHS[width]
    overrides = (*BIGFACE_COSFACE, f"model.kwargs={_flow({'layers': [1, 1, 1, 1], 'width': width})}")
    return Variant(f"width {width} ({params / 1e6:.2f}M)", overrides, "CosFace m 0.4", params / 1e6)


SCALED = {width: _scaled(width) for width in BACKBONE_WIDTHS}
STUDENT = SCALED[0.25]  # the default size's backbone
TEACHER = ("bigface_scaling", SCALED[0.5].label)  # 3.6x the student's parameters, trained on the same data
LAMBDA = 9.0  # BigFace's lambda on ||x̂_t - x̂_s||^2
DISTILL = ("objective.name=distillation", f"objective.kwargs={_flow({'lam': LAMBDA})}")
DISTILLED = Variant("distilled from width 0.5", (*STUDENT.overrides, *DISTILL), teacher=TEACHER)
# semi-supervised KD: 10,000 unlabelled images (synthetic: 2,000 unseen identities x 5), 64 of them added to every
# batch of 128 labelled images (data.unlabelled_ratio 0.5): the labelled budget is the plain student's
SEMI_SUPERVISED = Variant("distilled + 10k unlabelled", (*DISTILLED.overrides, "data.unlabelled_ratio=0.5"),
                          teacher=TEACHER, unlabelled=10_000)
MASK_RATIOS = (0.0, 0.35, 0.5)

# --------------------------------------------------------------------------------------------------
# AdaFace (issue 29): its claim, better on low-quality images and no worse on high-quality ones, tested against
# ArcFace with the same training augmentations (AdaFace Sec. 4: crop, low resolution, photometric, p = 0.2 each).
# s = 32 for both, as every head here; AdaFace's m = 0.4, h = 0.333 and t_alpha = 0.01 are the paper's.
ADAFACE_AUGMENT = (f"data.augment={_flow({'crop': 0.2, 'low_res': 0.2, 'photometric': 0.2})}",)
ADAFACE = _head("adaface", s=32.0, m=0.4, h=0.333)
ADAFACE_VARIANTS = (Variant("ArcFace + aug.", ARCFACE), Variant("AdaFace + aug.", ADAFACE))


EXPERIMENTS: dict[str, Experiment] = {
    "table6": Experiment(
        "SphereFace2 Table 6: loss functions compared",
        (
            Variant("Softmax", SOFTMAX),
            Variant("SphereFace", SPHEREFACE),
            Variant("CosFace", COSFACE),
            Variant("ArcFace", ARCFACE),
            Variant("SphereFace2", SPHEREFACE2),
        ),
    ),
    "table3": Experiment(
        "SphereFace2 Table 3: the design principles added in turn",
        (
            Variant("PN", _head("sphereface2", **{**SF2, "r": 1.0, "m": 0.0, "t": 1.0})),
            Variant("PN+EH", _head("sphereface2", **{**SF2, "m": 0.0, "t": 1.0})),
            Variant("PN+EH+AM", _head("sphereface2", **{**SF2, "t": 1.0})),
            Variant("PN+EH+AM+SA", SPHEREFACE2),
        ),
        notes="PN: lambda = 0.7 with r = 1 (no mining), m = 0, t = 1; EH: r = 30; AM: m = 0.4; SA: t = 3.",
    ),
    "noise": Experiment(
        "SphereFace2 Fig. 10 (left): training with shuffled labels",
        tuple(
            Variant(f"{name} {round(100 * p)}%", (*head, f"data.label_noise={p}"), name, 100 * p)
            for name, head in (("CosFace", COSFACE), ("SphereFace2", SPHEREFACE2))
            for p in NOISE_LEVELS
        ),
        x_label="labels shuffled (%)",
    ),
    # An extra, not a paper table (issue 5 section 3 allows one): SphereFace2 with a 3x loss weight, to test
    # whether its shortfall at this budget is the size of its updates (its gradient norm is about 2, ArcFace's
    # 4 to 16 under the clip of 5). The table6 row stays at the paper's settings.
    "sf2_loss_weight": Experiment(
        "Extra: SphereFace2's loss weight at this budget (not in the paper)",
        (Variant("SphereFace2", SPHEREFACE2), Variant("SphereFace2 lw=30", _head("sphereface2", **{**SF2, "loss_weight": 30.0}))),
        notes="SphereFace2 at the paper's settings (OpenSphere's lw = 10) against lw = 30, all else equal.",
    ),
    "broadface_queue": _broadface_experiment(
        "BroadFace Table 6a: queue size, with and without compensation (fine-tuned from ArcFace)",
        {size: _queue_variants(size) for size in SIZES},
        x_label="queue size",
    ),
    # Issue 16 section 5 again, with a fine-tune long enough for the queue to act (many-class size only).
    "broadface_long": _broadface_experiment(
        "BroadFace Table 6a at 5,000 classes, fine-tuned for 1,000 steps (queue 8192, with and without compensation)",
        {"many": _queue_variants("many")},
        budget=FINETUNE_LONG,
        notes="The same variants and start as broadface_queue's many-class rows, fine-tuned 1,000 steps instead "
              "of 120 (lr 0.01, x 0.1 at 625 and 875).",
    ),
    # Views of broadface_queue's runs (the same resolved configs: nothing is trained twice).
    "broadface_curve": _broadface_experiment(
        "BroadFace Fig. 7b: test accuracy against steps (fine-tuned from ArcFace)",
        {size: (ARCFACE_FINETUNED, _arcface_queue(size, QUEUES[-1], True), _arcface_queue(size, QUEUES[-1], False))
         for size in SIZES},
    ),
    "broadface_retrieval": _broadface_experiment(
        "BroadFace Table 5: Recall@K on the held-out (class-disjoint) gallery",
        {size: (ARCFACE_FINETUNED, *(_arcface_queue(size, q, True) for q in QUEUES)) for size in SIZES},
        columns=RETRIEVAL_COLUMNS,
        notes="Leave-one-out retrieval over the gallery of test identities never trained (SOP / In-Shop style).",
    ),
    "broadface_cosface": _broadface_experiment(
        "BroadFace Table 4: CosFace with BroadFace (fine-tuned from CosFace)",
        {
            size: (
                Variant("CosFace", COSFACE),
                Variant(f"CosFace + BroadFace q={QUEUES[1]}", _broadface(size, QUEUES[1], True, "cosface", s=32.0, m=0.35)),
            )
            for size in SIZES
        },
        init_from=("table6", "CosFace"),
    ),
    # An extra, not a paper table: BroadFace trained from scratch under table6's budget, where the embeddings
    # drift far more per step than in a fine-tune (lr 0.1 instead of 0.01), to see Eq. 7's compensation (and
    # Fig. 5a's cosine errors) where the queue is stale. Its ArcFace row is table6's run.
    "broadface_scratch": Experiment(
        "Extra: BroadFace from scratch at table6's budget (not in the paper)",
        {size: (Variant("ArcFace", ARCFACE), _arcface_queue(size, QUEUES[1], True), _arcface_queue(size, QUEUES[1], False))
         for size in SIZES},
        notes="160 steps at lr 0.1 from random weights, like table6; queue of 8192 (64 iterations).",
    ),
    # ---- the many-class regime (size "many" only)
    "attfc_ratio": Experiment(
        "AttFC Tables 1/2: the full FC against AttFC's container at ratios 0.1, 0.2, 0.3 (k = 2, attention)",
        {"many": (FULL_FC, *ATTFC.values())},
        notes=f"W = class centres in the softmax: C = {MANY_CLASSES} for the full FC, the container's S for AttFC. "
              f"gamma (Eq. 12) = {ATTFC_MOMENTUM}; evaluated with the query encoder (the trained backbone).",
    ),
    "attfc_k": Experiment(
        "AttFC Table 3: k class images per sample (ratio 0.3, attention)",
        {"many": tuple(Variant(f"AttFC-0.3 k={k}", _attfc(0.3, k), "AttFC-0.3", k) if k != 2 else
                       Variant(ATTFC[0.3].label, ATTFC[0.3].overrides, "AttFC-0.3", 2) for k in ATTFC_KS)},
        x_label="k (class images per sample)",
        notes="Memory per k: benchmarks/RESULTS.md section 15 (bench_attfc.py); images/s: the train s column.",
    ),
    "attfc_weighting": Experiment(
        "AttFC Table 4: generating the class centre from one image (DCQ), constant weights, attention weights",
        {"many": (Variant("single image (DCQ)", _attfc(0.3, 2, "single")),
                  Variant("constant 1/k", _attfc(0.3, 2, "constant")),
                  Variant("attention (Eq. 8)", _attfc(0.3, 2, "attention")))},
        notes="Ratio 0.3, k = 2 for all three (single uses the first class image).",
    ),
    "attfc_encoder": Experiment(
        "AttFC: evaluation with the query encoder (trained backbone) against the momentum class encoder",
        {"many": tuple(ATTFC.values())},
        columns=("accuracy", "momentum/accuracy", "tar@far=1e-03", "momentum/tar@far=1e-03", "recall@1",
                 "momentum/recall@1"),
        notes="A view of attfc_ratio's runs: every AttFC run's gallery is also scored with its momentum encoder.",
    ),
    # An extra, not a paper table: the full FC's rows are each updated about 5 times in 200 steps, so the first
    # table compares a converged container method with an underfit FC. 4x the budget (800 steps, 0.97 epoch of
    # glyphs) shows whether the gap closes towards the paper's "within 1 point at ratio 0.3".
    "attfc_budget": Experiment(
        "Extra: the full FC against AttFC-0.3 at 4x the budget (800 steps; not in the paper)",
        {"many": (FULL_FC, ATTFC[0.3])},
        overrides={"many": ("train.steps=800", "schedule.warmup_steps=80", "train.checkpoint_every=100")},
        notes="800 steps of 128 (poly decay, 80 warm-up steps); everything else as attfc_ratio.",
    ),
    "partial_fc": Experiment(
        "AttFC Table 5 / issue 16: full FC, Partial FC and AttFC at equal W-size",
        {"many": (FULL_FC, PARTIAL_FC[0.1], ATTFC[0.1], PARTIAL_FC[0.3], ATTFC[0.3])},
        notes="Partial FC's rate is chosen so that its sampled rows per step equal AttFC's S at the same ratio "
              "(0.0768 and 0.2816 of 5,000 classes).",
    ),
    "adaface_quality": Experiment(
        "AdaFace: ArcFace and AdaFace, both trained with AdaFace's augmentations",
        {"default": ADAFACE_VARIANTS, "many": ADAFACE_VARIANTS},
        overrides=ADAFACE_AUGMENT,
        notes="Both heads train on images cropped in place, downscaled and colour-jittered with p = 0.2 each "
              "(data.augment); s = 32 for both, AdaFace m = 0.4, h = 0.333 (the paper's). The claim: better on "
              "low-quality pairs, no worse on clean ones.",
    ),
    # ---- BigFace (issue 15 section 5), default size
    "bigface_masks": Experiment(
        "BigFace: mask augmentation at ratios 0, 0.35 and 0.5, scored on unmasked and masked pairs",
        {"default": tuple(Variant(f"mask ratio {r}", (*STUDENT.overrides, f"data.mask_ratio={r}") if r else
                                  STUDENT.overrides, "CosFace m 0.4", r) for r in MASK_RATIOS)},
        columns=("accuracy", "masked/accuracy", "tar@far=1e-03", "masked/tar@far=1e-03", "eer", "masked/eer"),
        x_label="mask ratio (training)",
        masked=True,
        datasets=("synthetic",),
        notes="Masked: one side of every pair wears a synthetic mask (faceforge.data.masks, MFR style), the other "
              "not. Synthetic faces only: the masks are drawn from the face template's landmarks.",
    ),
    "bigface_scaling": Experiment(
        "BigFace Fig. 1: verification against backbone parameters at one budget",
        {"default": tuple(SCALED.values())},
        x_label="backbone parameters (M)",
        power_law=True,
        notes="IResNet with one block per stage, widths 0.125 to 0.5, CosFace (s 32, m 0.4), 160 steps of 128.",
    ),
    "bigface_distill": Experiment(
        "BigFace Table 2: the student alone, distilled from a bigger teacher, and with unlabelled images",
        {"default": (STUDENT, DISTILLED, SEMI_SUPERVISED)},
        masked=True,
        columns=("accuracy", "tar@far=1e-03", "tar@far=1e-04", "eer", "recall@1", "masked/accuracy"),
        notes=f"Student: width 0.25 (0.37M); teacher: width 0.5 (1.36M), bigface_scaling's run of the same "
              f"dataset and seed. Loss: CosFace + {LAMBDA:g} x mean ||x̂_t - x̂_s||^2 (BigFace Eq. 1-2), equal "
              f"student budget (160 steps of 128 labelled images).",
    ),
}

# The heads of issue 29 at the many-class size, ArcFace's s 32 for every one (the papers' s 64 is for 85k classes)
# and each paper's own margins: equal budgets, only the head differs.
MODERN_HEADS = (
    Variant("ArcFace", ARCFACE),
    Variant("CurricularFace", _head("curricularface", s=32.0, m=0.5)),
    Variant("ElasticFace-Arc", _head("elasticface_arc", s=32.0)),
    Variant("ElasticFace-Arc+", _head("elasticface_arc_plus", s=32.0)),
    Variant("ElasticFace-Cos", _head("elasticface_cos", s=32.0)),
    Variant("ElasticFace-Cos+", _head("elasticface_cos_plus", s=32.0)),
    Variant("AdaFace", _head("adaface", s=32.0)),
    Variant("MagFace", _head("magface", s=32.0)),
    Variant("Sub-center ArcFace (K 3)", _head("subcenter_arcface", s=32.0, m=0.5)),
)
SUBCENTER = _head("subcenter_arcface", s=32.0, m=0.5)
NOISE_LEVELS = (0.0, 0.2, 0.4)


def _attfc_default_size(s: float, momentum: float, container: int | None, k: int) -> tuple[str, ...]:
    """AttFC at the default size (500 classes, batch 128): ratio 0.3 gives S = floor(150 / 128) 128 = 128, ONE batch
    of negatives, unless ``container`` sets S."""
    kwargs: dict[str, Any] = {"ratio": 0.3, "batch_size": 128, "s": s, "m2": 0.5}
    if container is not None:
        kwargs["container_size"] = container
    return (*_head("attfc", **kwargs), "objective.name=attfc", f"objective.kwargs={_flow({'momentum': momentum})}",
            "data.sampler=attfc", f"data.sampler_kwargs={_flow({'k': k})}")


# AttFC as a new user meets it at few classes (issue 29): its defaults, then one change at a time.
ATTFC_FEW_CLASSES = (
    Variant("ArcFace s 32 (W 500)", ARCFACE),
    Variant("ArcFace s 64 (W 500)", _head("arcface", s=64.0, m=0.5)),
    Variant("AttFC defaults (S 128, s 64, gamma 0.999, k 2)", _attfc_default_size(64.0, 0.999, None, 2)),
    Variant("+ s 32", _attfc_default_size(32.0, 0.999, None, 2)),
    Variant("+ gamma 0.9", _attfc_default_size(32.0, 0.9, None, 2)),
    Variant("+ S 512 (every class)", _attfc_default_size(32.0, 0.9, 512, 2)),
    Variant("+ k 4", _attfc_default_size(32.0, 0.9, 512, 4)),
)

# Issue 30: a ViT-T against an IResNet of similar cost at the default size (32 px), equal budget (160 steps of 128,
# ArcFace s 32), each with and without a model EMA. vit_t at width 0.25 (C 64, 12 blocks, 8 heads) with 8 px patches
# (4 x 4 = 16 tokens at 32 px): 0.69M parameters and 10.1 MFLOPs against the IResNet's 0.37M and 8.9 MFLOPs
# (python -m faceforge.backbones.complexity). Its recipe: AdamW lr 1e-3, weight decay 0.1 off norms, biases, the
# position embeddings and the mask token; the same warm-up and poly decay as every run of this size.
VIT_T_SMALL = ("model.backbone=vit_t", f"model.kwargs={_flow({'width': 0.25, 'patch_size': 8})}")
VIT_RECIPE = ("optim.name=adamw", "optim.lr=0.001", "optim.weight_decay=0.1", "optim.no_decay_bn_bias=true")
EMA = (f"train.ema={_flow({'decay': 0.97, 'every': 1})}",)  # about the last 33 of 160 steps
VIT_VS_IRESNET = (
    Variant("IResNet (0.37M, 8.9 MFLOPs), SGD", ARCFACE),
    Variant("IResNet, SGD + EMA 0.97", (*ARCFACE, *EMA)),
    Variant("ViT-T w0.25 p8 (0.69M, 10.1 MFLOPs), AdamW", (*ARCFACE, *VIT_T_SMALL, *VIT_RECIPE)),
    Variant("ViT-T, AdamW + EMA 0.97", (*ARCFACE, *VIT_T_SMALL, *VIT_RECIPE, *EMA)),
    Variant("ViT-T, SGD (the IResNet's optimiser)", (*ARCFACE, *VIT_T_SMALL)),
)

EXPERIMENTS.update({
    "modern_heads": Experiment(
        "Issue 29: CurricularFace, ElasticFace, AdaFace, MagFace and sub-center ArcFace against ArcFace",
        {"many": MODERN_HEADS, "default": MODERN_HEADS},
        notes="s 32 for every head; margins at each paper's defaults (CurricularFace m 0.5; ElasticFace-Arc "
              "N(0.5, 0.05), -Cos N(0.35, 0.05); AdaFace m 0.4, h 0.333; MagFace m 0.45-0.8 over a in [10, 110], "
              "lambda_g 35; sub-center K 3, m 0.5).",
    ),
    "subcenter_noise": Experiment(
        "Sub-center ArcFace under label noise (its Table: robustness to noisy web faces)",
        tuple(Variant(f"{name} {round(100 * p)}%", (*head, f"data.label_noise={p}") if p else head, name, 100 * p)
              for name, head in (("ArcFace", ARCFACE), ("Sub-center ArcFace", SUBCENTER)) for p in NOISE_LEVELS),
        x_label="label noise (%)",
        notes="data.label_noise flips that share of the training labels to another class (the noise experiment's).",
    ),
    "vit_vs_iresnet": Experiment(
        "Issue 30: ViT-T against an IResNet of similar cost, with and without a model EMA",
        {"default": VIT_VS_IRESNET},
        notes="Default size, equal budget (160 steps of 128, ArcFace s 32); the ViT at its transformer recipe "
              "(AdamW) and at the IResNet's SGD; EMA decay 0.97 every step, the averaged backbone scored.",
    ),
    "attfc_few_classes": Experiment(
        "AttFC as a user meets it at few classes: its defaults, then one change at a time",
        {"default": ATTFC_FEW_CLASSES},
        datasets=("synthetic",),
        notes="Default size (500 classes, 160 steps of 128). ratio 0.3 of 500 classes holds floor(150 / 128) = 1 "
              "global batch: S = 128 negatives, the previous batch's centres. gamma 0.999 (the paper's, MoCo's) is "
              "a 1,000-step time constant in a 160-step run.",
    ),
})

# BroadFace's grid (issue 6 section 2): broadface_curve and broadface_retrieval add no runs.
BROADFACE_EXPERIMENTS = ("broadface_queue", "broadface_curve", "broadface_retrieval", "broadface_cosface")

# What `make bench-accuracy` runs (issue 5 section 3), on both datasets with 3 seeds.
DEFAULT_EXPERIMENTS = ("table6", "table3", "noise")
DEFAULT_DATASETS = ("synthetic", "glyphs")
DEFAULT_SEEDS = 3
