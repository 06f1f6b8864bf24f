"""What the accuracy harness runs, declared as data: the equal budgets, the datasets and the experiments.

A run's config is ``BASE[size]``, then ``DATASETS[dataset][size]`` (the ``data`` section), then the
experiment's overrides, then the variant's, then ``seed``: dotted ``key=value`` strings, exactly as on the
``faceforge train`` command line. Within one size every variant of every experiment shares the backbone,
data, steps, batch, optimiser and schedule; a variant changes only the head (and its kwargs) or, for the
label-noise experiment, ``data.label_noise``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SIZES = ("default", "full")

# The equal budget of each size (everything but the head and the data section).
BASE: dict[str, dict[str, Any]] = {
    # 2-core CPU: a run trains in about 25 s (IResNet with one block per stage at quarter width, 32 px).
    "default": {
        "model": {"backbone": "iresnet", "embedding_size": 128, "kwargs": {"layers": [1, 1, 1, 1], "width": 0.25}},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "poly", "warmup_steps": 20},
        "train": {"steps": 160, "clip_grad_norm": 5.0, "log_every": 20, "checkpoint_every": 40, "progress": False},
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
    "full": {"per_identity": 20, "pairs": 400_000},
}

# Trainer-side evaluation for learning curves: every N steps on this many pairs (train.log "eval step" lines).
CURVE: dict[str, dict[str, int]] = {
    "default": {"every": 20, "pairs": 2000},
    "full": {"every": 200, "pairs": 6000},
}


@dataclass(frozen=True)
class Variant:
    """One column of a paper's table: a label and its dotted overrides. ``x`` places it on a line plot's
    x axis within ``series`` (e.g. label-noise level within a head); None = a bar."""

    label: str
    overrides: tuple[str, ...]
    series: str | None = None
    x: float | None = None


@dataclass(frozen=True)
class Experiment:
    """A paper table or figure. ``variants`` may differ per size (a dict size -> variants); ``curve``
    records the trainer's verification every ``CURVE[size]["every"]`` steps for learning curves."""

    title: str
    variants: tuple[Variant, ...] | dict[str, tuple[Variant, ...]]
    overrides: tuple[str, ...] = ()
    curve: bool = False
    x_label: str = ""
    notes: str = field(default="", compare=False)

    def variants_for(self, size: str) -> tuple[Variant, ...]:
        return self.variants[size] if isinstance(self.variants, dict) else self.variants


def _head(name: str, **kwargs: Any) -> tuple[str, ...]:
    """``head.name=...`` and ``head.kwargs={...}`` overrides (kwargs as a YAML flow mapping)."""
    flow = ", ".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in kwargs.items())
    return (f"head.name={name}", f"head.kwargs={{{flow}}}")


# The heads at the hyperparameters of their papers, scaled to a few hundred classes (s = 32 is ample
# for 500 classes: ArcFace's bound s >= (C-1)/C log((C-1) P / (1-P)) is 9 at P = 0.9).
SOFTMAX = _head("softmax")
COSFACE = _head("cosface", s=32.0, m=0.35)
ARCFACE = _head("arcface", s=32.0, m=0.5)
SPHEREFACE = _head("sphereface", s=32.0, m=1.35)
# SphereFace2 as in the paper (r = 30, m = 0.4 fixed, lambda = 0.7, t = 3; OpenSphere's lw = 10).
SF2 = {"lamb": 0.7, "r": 30.0, "m": 0.4, "t": 3.0, "loss_weight": 10.0}
SPHEREFACE2 = _head("sphereface2", **SF2)


def _broadface(queue: int, compensate: bool = True, inner: str = "arcface", **inner_kwargs: Any) -> tuple[str, ...]:
    flow = ", ".join(f"{k}: {v}" for k, v in inner_kwargs.items())
    return (
        "head.name=broadface",
        f"head.kwargs={{queue_size: {queue}, compensate: {str(compensate).lower()}, head: {inner}, head_kwargs: {{{flow}}}}}",
    )


NOISE_LEVELS = (0.0, 0.2, 0.4, 0.6)
# BroadFace queue sizes per size: the paper's 2k/8k/32k on the full size; on the CPU size the training
# set is 20k images, so the queue is scaled down to stay well inside one epoch.
QUEUES = {"default": (512, 2048, 8192), "full": (2048, 8192, 32768)}


def _queue_variants(size: str) -> tuple[Variant, ...]:
    return (Variant("ArcFace", ARCFACE, "compensated", 0),) + tuple(
        v for q in QUEUES[size] for v in (
            Variant(f"BroadFace q={q}", _broadface(q, True, s=32.0, m=0.5), "compensated", q),
            Variant(f"BroadFace q={q} no comp.", _broadface(q, False, s=32.0, m=0.5), "not compensated", q),
        )
    )


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
    # BroadFace (issue 6): declared here so that its runs go through the same harness; each runs once the
    # "broadface" head is registered.
    "broadface_queue": Experiment(
        "BroadFace Table 6a: queue size, with and without compensation",
        {size: _queue_variants(size) for size in SIZES},
        x_label="queue size",
    ),
    "broadface_curve": Experiment(
        "BroadFace Fig. 7b: test accuracy against steps",
        {
            size: (
                Variant("ArcFace", ARCFACE),
                Variant(f"BroadFace q={QUEUES[size][-1]}", _broadface(QUEUES[size][-1], True, s=32.0, m=0.5)),
                Variant(f"BroadFace q={QUEUES[size][-1]} no comp.", _broadface(QUEUES[size][-1], False, s=32.0, m=0.5)),
            )
            for size in SIZES
        },
        curve=True,
    ),
    "broadface_cosface": Experiment(
        "BroadFace Table 4: CosFace with BroadFace",
        {
            size: (
                Variant("CosFace", COSFACE),
                Variant(f"CosFace + BroadFace q={QUEUES[size][1]}", _broadface(QUEUES[size][1], True, "cosface", s=32.0, m=0.35)),
            )
            for size in SIZES
        },
    ),
}

# What `make bench-accuracy` runs (issue 5 section 3), on both datasets with 3 seeds.
DEFAULT_EXPERIMENTS = ("table6", "table3", "noise")
DEFAULT_DATASETS = ("synthetic", "glyphs")
DEFAULT_SEEDS = 3
