"""The contract every registered head and backbone keeps (timm's test_models.py is the model): parametrised
over the registries, so a head or backbone added later is tested here without a line of its own.

Heads (``faceforge.heads.HEADS``), built as ``build(name, num_classes=5, embedding_size=4, **HEAD_KWARGS.get(name))``
and called as ``head(embeddings, labels, *HEAD_INPUTS[name])`` (AttFC's class features):
forward and backward finite; ``per_sample_loss`` averages to the loss (``ClassifierHead`` heads without a
batch-level term); a state_dict round trip gives the same loss; a float64 gradient check of the loss in the
embeddings and every parameter against central differences; a checkpoint/resume round trip through the trainer, bit for bit.

Backbones (``faceforge.backbones.BACKBONES``), built at 32x32 with an 8-D embedding and the narrowest widths
(``backbone_kwargs``): forward and backward finite with the right shape, a state_dict round trip.

Training sets (``faceforge.train.data.DATASETS``): one item contract, normalised float tensors and int labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.func import functional_call

from _runs import make_config, resumed_equals_straight
from faceforge.backbones import BACKBONES
from faceforge.heads import HEADS
from faceforge.heads.base import ClassifierHead
from faceforge.train.data import DATASETS, build_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

C, D, B = 5, 4, 6

# Arguments a head cannot do without (everything else keeps its default).
HEAD_KWARGS: dict[str, dict[str, Any]] = {"broadface": {"queue_size": 8}, "attfc": {"batch_size": B, "container_size": 2 * B}}
# Arguments for the central-difference check only: a margin of the DETACHED embedding norm (a stop-gradient that
# central differences see and autograd does not, by design) made norm-independent there; test_adaface.py checks
# the norm-dependent gradient with the norms held fixed.
GRADCHECK_KWARGS: dict[str, dict[str, Any]] = {"adaface": {"h": 1e-12}}
# Inputs a head takes after (embeddings, labels): AttFC's class features (B, k, D) from its momentum encoder.
HEAD_INPUTS: dict[str, Any] = {
    "attfc": lambda dtype: (torch.randn(B, 2, D, generator=torch.Generator().manual_seed(2), dtype=dtype),),
}
# What the trainer needs beside the head (AttFC: its sampler and objective; the head's global batch).
HEAD_SECTIONS: dict[str, dict[str, Any]] = {
    "attfc": {"objective": {"name": "attfc"}, "data": {"sampler": "attfc", "sampler_kwargs": {"k": 2}},
              "head_kwargs": {"batch_size": 8, "container_size": 16}},
}


def extra_inputs(name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return HEAD_INPUTS[name](dtype) if name in HEAD_INPUTS else ()


def make_head(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    return HEADS.build(name, num_classes=C, embedding_size=D, **HEAD_KWARGS.get(name, {}), **kwargs).to(dtype)


def batch(dtype: torch.dtype = torch.float32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=dtype), torch.randint(0, C, (B,), generator=g)


@pytest.mark.parametrize("name", HEADS.names())
def test_head_forward_backward_finite(name: str) -> None:
    head = make_head(name)
    x, y = batch()
    x.requires_grad_(True)
    for _ in range(2):  # the second call sees any state the first left (a queue)
        loss = head(x, y, *extra_inputs(name))
        assert loss.shape == () and torch.isfinite(loss), name
        loss.backward()
    assert torch.isfinite(x.grad).all()
    for pname, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {pname}"


def classifier_heads() -> list[str]:
    """The registered heads that are a ``ClassifierHead`` whose loss is the mean of ``per_sample_loss`` (not
    BroadFace: Eq. 8 + 9 with stop-gradients on purpose, tested in test_broadface.py; nor AttFC, whose centre w+
    depends on f through Eq. 8 but takes no gradient, as in the official code: test_attfc.py checks its gradient)."""
    heads = {name: make_head(name) for name in HEADS.names()}
    return [n for n, h in heads.items() if isinstance(h, ClassifierHead) and not h.batch_level_loss]


@pytest.mark.parametrize("name", classifier_heads())
def test_head_per_sample_loss_averages_to_the_loss(name: str) -> None:
    head = make_head(name, torch.float64)
    x, y = batch(torch.float64)
    loss = head(x, y)  # first: a training forward observes its batch before its loss (AdaFace's norm statistics)
    per_sample = head.per_sample_loss(x, y)
    assert per_sample.shape == (B,)
    torch.testing.assert_close(per_sample.mean(), loss, rtol=1e-12, atol=0.0)
    subcentres = getattr(head, "subcentres", None)  # (C, K, D) for a head of K sub-centres a class
    assert head.weight.shape == ((C, D) if subcentres is None else (C, subcentres, D))


@pytest.mark.parametrize("name", HEADS.names())
def test_head_state_dict_round_trip(name: str) -> None:
    head, other = make_head(name, seed=0), make_head(name, seed=1)
    x, y = batch()
    more = extra_inputs(name)
    head(x, y, *more)  # a state beyond the initial one (a queue)
    other.load_state_dict(head.state_dict())
    for a, b in zip(head.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    head.eval(), other.eval()
    assert torch.equal(head(x, y, *more), other(x, y, *more))


def numerical_gradient(f: Any, inputs: list[torch.Tensor], eps: float = 1e-6) -> list[torch.Tensor]:
    """Central differences of the scalar f(*inputs), coordinate by coordinate (float64)."""
    grads = []
    with torch.no_grad():
        for t in inputs:
            g = torch.zeros_like(t)
            flat = t.view(-1)
            for i in range(t.numel()):
                saved = flat[i].item()
                flat[i] = saved + eps
                up = f(*inputs).item()
                flat[i] = saved - eps
                down = f(*inputs).item()
                flat[i] = saved
                g.view(-1)[i] = (up - down) / (2 * eps)
            grads.append(g)
    return grads


@pytest.mark.parametrize("name", classifier_heads())
def test_head_gradient_check_float64(name: str) -> None:
    """Autograd's gradient of the loss in the embeddings and every parameter = central differences (float64).

    Not torch.autograd.gradcheck: that evaluates the function again while the first graph is alive, and the
    chunked kernels reuse their buffers from one call to the next (a graph is good until the next forward).
    Tolerance: central differences at eps = 1e-6 err by O(eps^2) times the third derivative plus O(1e-16 / eps)
    rounding, about 1e-9 here; rtol 1e-5 / atol 1e-7 leaves room and still fails a wrong term.
    """
    head = make_head(name, torch.float64, **GRADCHECK_KWARGS.get(name, {}))
    x, y = batch(torch.float64)
    head.eval()
    names = [n for n, p in head.named_parameters() if p.requires_grad]
    inputs = [x.clone()] + [p.detach().clone() for n, p in head.named_parameters() if p.requires_grad]

    def loss(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return functional_call(head, dict(zip(names, values)), (x, y))

    leaves = [t.clone().requires_grad_(True) for t in inputs]
    analytical = torch.autograd.grad(loss(*leaves), leaves)
    for what, a, n in zip(["embeddings", *names], analytical, numerical_gradient(loss, inputs)):
        torch.testing.assert_close(a, n, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: d loss / d {what}: {m}")


@pytest.mark.equivalence
@pytest.mark.parametrize("name", HEADS.names())
def test_head_checkpoint_resume_through_the_trainer(tmp_path: Path, name: str) -> None:
    sections = dict(HEAD_SECTIONS.get(name, {}))
    kwargs = {**HEAD_KWARGS.get(name, {}), **sections.pop("head_kwargs", {})}
    state = resumed_equals_straight(
        tmp_path, steps=2, head={"name": name, "kwargs": kwargs}, model={"kwargs": {"dropout": 0.0}},
        data={"num_identities": 4, "images_per_identity": 8, "batch_size": 8, **sections.pop("data", {})}, **sections,
    )
    assert state["step"] == 2


# ---------------------------------------------------------------------------------------------- backbones


def backbone_kwargs(name: str) -> dict[str, Any]:
    """The smallest sensible build of a registered backbone: 32x32 input, 8-D embedding, narrow widths."""
    kwargs: dict[str, Any] = {"embedding_size": 8, "input_size": 32}
    factory = BACKBONES.get(name)
    module = getattr(factory, "__module__", "")
    if name.startswith(("mbf", "mobilefacenet")) or "mobilefacenet" in module:
        kwargs["scale"] = 1
    else:  # IResNet and SFNet take a width multiplier
        kwargs["width"] = 1 / 16
    return kwargs


# BigFace's deepest IResNets take seconds each to build twice and run; r18 .. r200 run the same code by default.
DEEP = {"r240", "r600", "r1200"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n for n in BACKBONES.names()]
)
def test_backbone_forward_backward_and_state_dict(name: str) -> None:
    torch.manual_seed(0)
    net = BACKBONES.build(name, **backbone_kwargs(name))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = net(images)
    assert out.shape == (2, 8) and torch.isfinite(out).all(), name
    out.square().sum().backward()
    for pname, p in net.named_parameters():
        if not p.requires_grad:  # frozen by design (IResNet's final BN scale, as in insightface)
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {pname}"
    torch.manual_seed(1)
    other = BACKBONES.build(name, **backbone_kwargs(name))
    other.load_state_dict(net.state_dict())
    net.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(net(images), other(images))


# ---------------------------------------------------------------------------------------------- training sets


def _raw_images() -> list[tuple[Any, int]]:
    """12 random uint8 (16, 16, 3) RGB images of 3 classes (4 each), as (image, label)."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), i // 4) for i in range(12)]


_RAW_IMAGES = _raw_images()


def _dataset_data(name: str, folder: Path) -> dict[str, Any]:
    """``data`` keys that make a tiny training set of each registered ``data.name`` (12 images of 3 classes, 16 px)."""
    from PIL import Image

    from faceforge.data import recordio

    images = _RAW_IMAGES
    if name == "synthetic":
        return {"num_identities": 3, "images_per_identity": 4}
    if name == "recordio":
        recordio.write(folder / "train", images)
        return {"path": str(folder / "train")}
    if name == "folder":
        for k, (image, label) in enumerate(images):
            (folder / "faces" / f"id{label}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / "faces" / f"id{label}" / f"{k}.png")
        return {"path": str(folder / "faces")}
    if name == "glyphs":
        import matplotlib

        fonts = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
        return {"path": str(fonts), "glyph_charset": "latin_greek_cyrillic", "num_identities": 3,
                "eval_identities": 2, "eval_pairs": 0}
    raise AssertionError(f"data.name {name!r}: add a tiny set for it here")


# Rendering the glyph set takes seconds; test_glyphs.py checks the same item contract by default.
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "glyphs" else n for n in DATASETS.names()]
)
def test_training_sets_share_one_item_contract(tmp_path: Path, name: str) -> None:
    """Every training set: ``ds[i] -> ((3, S, S) float32 in [-1, 1], int label in [0, num_classes))`` (the
    readers below them return uint8 HWC images; the training set normalises them, ``(x - 127.5) / 127.5``)."""
    cfg = make_config(tmp_path / "run", data={"name": name, "image_size": 16, "eval_pairs": 0,
                                              **_dataset_data(name, tmp_path)})
    dataset = build_dataset(cfg)
    assert len(dataset) > 0 and int(dataset.num_classes) >= 1
    for i in (0, len(dataset) - 1):
        image, label = dataset[i]
        assert isinstance(image, torch.Tensor) and image.dtype == torch.float32 and image.shape == (3, 16, 16), name
        assert -1.0 <= float(image.min()) <= float(image.max()) <= 1.0
        assert isinstance(label, int) and 0 <= label < int(dataset.num_classes)
        if name in ("recordio", "folder"):  # the sets made from known uint8 images: the item is one of its
            # class's images, normalised: (x - 127.5) / 127.5 in float32, CHW, RGB. Within 2^-23 (one float32
            # rounding of a value in [-1, 1], whichever order the reader divides and subtracts in).
            candidates = [torch.from_numpy(x).permute(2, 0, 1).double().sub(127.5).div(127.5)
                          for x, y in _RAW_IMAGES if y == label]
            assert min(float((image.double() - c).abs().max()) for c in candidates) <= 2.0 ** -23, name
