"""`faceforge clean RUN [--data PATH] [--out PREFIX] [--angle 75]`: Sub-center ArcFace's cleaning of noisy labels.

Deng et al. 2020, Sec. 3 ("Sub-center ArcFace" on noisy web faces): after training with K sub-centres a class, each
class keeps its dominant sub-centre (the one most of its samples are nearest to) and drops the samples whose angle to
it is larger than a threshold (75 degrees in the paper); the non-dominant sub-centres, where the noise gathered, go.

Steps (each a small function below, used by the command and by the accuracy harness):

1. the run's checkpoint (a run folder's ``last.pt`` or a ``.pt``), its row-sharded tensors assembled whole
   (``core.shards.resolve``), so a ``head.shard: true`` run cleans like an unsharded one; its head's weight must be
   (C, K, D) (``head.name: subcenter_arcface``, also inside ``broadface``);
2. the training set: the run's own (the built-in synthetic set with its ``data.label_noise``, as trained), or
   ``--data PATH`` (a ``.rec`` prefix or an image folder, decided by ``data.source.open_source``); a run whose data
   has a path needs ``--data`` (a checkpoint is data: it does not choose the files ``clean`` reads);
3. the trained backbone embeds every training image (no flip); :func:`select_clean` keeps a sample when its angle
   to its class's dominant sub-centre is <= the threshold;
4. the kept images, with the labels they were trained with, are written as a ``.rec``/``.idx`` (insightface
   RecordIO, ``data.recordio.write``; classes keep their numbers, so a class left empty keeps its row), which
   ``faceforge train`` reads with ``data.name: recordio`` and ``data.path: PREFIX``; and the report,
   ``PREFIX.json`` (printed too): samples and classes kept and dropped, the dropped sample ids, and, for a set with
   known flipped labels (``data.label_noise``), the precision and recall of the dropped set against them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from faceforge.core.checkpoint import CHECKPOINT_NAME, load_checkpoint
from faceforge.core.fileio import write_bytes
from faceforge.core.shards import resolve
from faceforge.heads.subcenter import angles_to_subcentres, dominant_subcentres

DEFAULT_ANGLE = 75.0  # degrees: Deng et al. 2020, Sec. 3 (the constraint angle of the cleaning step)
EXPECTED_HEAD = "subcenter_arcface"

__all__ = ["DEFAULT_ANGLE", "CleanResult", "clean_run", "flip_scores", "run_checkpoint", "select_clean",
           "subcentre_weight"]


@dataclass
class CleanResult:
    """What the cleaning decided, per sample of the training set (indices into it, in its order).

    kept, dropped: (N_kept,), (N_dropped,) int64 sample ids; dominant: (C,) each class's dominant sub-centre;
    angles: (N,) each sample's angle in degrees to its class's dominant sub-centre; labels: (N,) the labels the run
    trained with; flipped: (M,) the samples whose label was changed by ``data.label_noise`` (None when unknown)."""

    kept: np.ndarray
    dropped: np.ndarray
    dominant: np.ndarray
    angles: np.ndarray
    labels: np.ndarray
    num_classes: int
    angle: float
    flipped: np.ndarray | None = None
    files: dict[str, str] = field(default_factory=dict)

    def classes_emptied(self) -> np.ndarray:
        """The classes that had samples and have none left (int64)."""
        before = np.unique(self.labels)
        return np.setdiff1d(before, np.unique(self.labels[self.kept]))

    def report(self) -> dict[str, Any]:
        """The JSON report: counts, the dropped ids, and the precision / recall against known flipped labels."""
        out: dict[str, Any] = {
            "angle_degrees": self.angle, "samples": int(self.labels.size), "kept": int(self.kept.size),
            "dropped": int(self.dropped.size), "classes": self.num_classes,
            "classes_with_samples": int(np.unique(self.labels).size),
            "classes_emptied": self.classes_emptied().tolist(), "dropped_ids": self.dropped.tolist(), **self.files,
        }
        if self.flipped is not None:
            out.update(flip_scores(self.dropped, self.flipped))
        return out

    def summary(self) -> str:
        """The printed report, a few lines."""
        r = self.report()
        lines = [f"kept {r['kept']} of {r['samples']} samples, dropped {r['dropped']} "
                 f"({100.0 * r['dropped'] / max(r['samples'], 1):.1f} %) farther than {self.angle:g} degrees from "
                 f"their class's dominant sub-centre",
                 f"classes: {r['classes_with_samples']} with samples, {len(r['classes_emptied'])} left without any"]
        if self.flipped is not None:
            lines.append(f"against the {r['flipped']} flipped labels: precision {r['precision']:.3f}, "
                         f"recall {r['recall']:.3f}")
        lines += [f"wrote {v}" for v in self.files.values()]
        return "\n".join(lines)


def flip_scores(dropped: np.ndarray, flipped: np.ndarray) -> dict[str, float | int]:
    """Precision (the share of dropped samples whose label was flipped) and recall (the share of flipped samples
    dropped) of a cleaning; NaN-free: 0 when nothing was dropped / flipped."""
    hit = int(np.intersect1d(dropped, flipped).size)
    return {"flipped": int(flipped.size), "dropped_flipped": hit,
            "precision": hit / dropped.size if dropped.size else 0.0,
            "recall": hit / flipped.size if flipped.size else 0.0}


def select_clean(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, angle: float = DEFAULT_ANGLE
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cleaning rule (Sec. 3) on embeddings (N, D) with labels (N,) and sub-centres weight (C, K, D):
    ``(keep (N,) bool, dominant (C,) int64, angle to the dominant sub-centre (N,) degrees)``."""
    angles = angles_to_subcentres(embeddings, weight, labels)  # (N, K)
    dominant = dominant_subcentres(angles.argmin(1), labels, weight.shape[0], weight.shape[1])
    to_dominant = angles.gather(1, dominant[labels].unsqueeze(1)).squeeze(1)
    return to_dominant <= angle, dominant, to_dominant


def run_checkpoint(run: str | Path) -> Path:
    """The checkpoint of RUN: a run folder's ``last.pt`` or a ``.pt`` file. FileNotFoundError naming RUN."""
    p = Path(run)
    if p.is_dir() and (p / CHECKPOINT_NAME).is_file():
        return p / CHECKPOINT_NAME
    if p.is_file():
        return p
    raise FileNotFoundError(f"{run}: no run folder with a {CHECKPOINT_NAME} and no checkpoint file; expected the "
                            "folder of a `faceforge train` run")


def subcentre_weight(state: dict[str, Any], head_name: str, where: str) -> torch.Tensor:
    """The run's sub-centres (C, K, D) from a checkpoint's head state (``weight``, or ``head.weight`` of a wrapper
    such as BroadFace). ValueError naming ``where`` when the head has none."""
    head = state.get("head") or {}
    weight = next((head[k] for k in ("weight", "head.weight") if torch.is_tensor(head.get(k))), None)
    if weight is None or weight.dim() != 3:
        raise ValueError(f"{where}: head {head_name!r} has no sub-centres; expected a run trained with head.name: "
                         f"{EXPECTED_HEAD}")
    return weight.detach().float()


def _training_set(cfg: Any, data: str | None, where: str) -> Any:
    """The run's training set, or the one at ``data`` (module docstring, step 2)."""
    from faceforge.data.source import open_source
    from faceforge.train.data import build_dataset

    if data is not None:
        found = open_source(data)  # SourceError (FileNotFoundError) naming the path
        if found.format not in ("rec", "folder"):
            raise ValueError(f"{data}: a .{found.format} holds verification pairs; expected the training images (a "
                             ".rec prefix or an image folder)")
        cfg.data.name, cfg.data.path, cfg.data.kwargs = ("recordio" if found.format == "rec" else "folder",
                                                         found.path, {})
    elif cfg.data.path:
        raise ValueError(f"{where}: the run trained on data.path {str(cfg.data.path)[:200]!r}; pass the images to "
                         "clean with --data PATH (a checkpoint does not choose the files clean reads)")
    return build_dataset(cfg)


def _embed(backbone: torch.nn.Module, dataset: Any, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (N, D) float32, labels (N,) int64) of every item of ``dataset``, in order, eval mode, no flip."""
    backbone.eval()
    out, labels = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            out.append(backbone(torch.stack([image for image, _ in items])).float())
            labels += [int(label) for _, label in items]
    embeddings = torch.cat(out)
    if not torch.isfinite(embeddings).all():
        raise FloatingPointError("the backbone gave a non-finite embedding; the run cannot be used to clean")
    return embeddings, torch.tensor(labels, dtype=torch.long)


def _uint8(image: torch.Tensor) -> np.ndarray:
    """A training tensor (3, S, S), (x - 127.5) / 127.5, back to its uint8 (S, S, 3) image (exact: float32 keeps
    the 256 levels 2^-7 apart, rounding recovers them)."""
    return image.mul(127.5).add(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _write(prefix: Path, dataset: Any, kept: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    """The kept items as ``prefix.rec`` / ``.idx``, grouped by class (RecordIO keeps a class's images together)."""
    from faceforge.data.recordio import write

    order = kept[np.argsort(labels[kept], kind="stable")]
    write(prefix, ((_uint8(dataset[int(i)][0]), int(labels[i])) for i in order), image_format="png",
          num_classes=num_classes)


def clean_run(run: str | Path, data: str | None = None, out: str | Path | None = None,
              angle: float = DEFAULT_ANGLE, batch_size: int = 256, write: bool = True,
              trust_code: bool = False) -> CleanResult:
    """Clean the training set of RUN (module docstring); ``out`` the output prefix (default ``RUN/cleaned``; a
    trailing ``.rec`` is dropped). ``write=False`` decides without writing (the harness's precision / recall).
    ``trust_code``: the run may name a backbone by ``package.module:Class`` (``build.load_backbone``)."""
    from faceforge.build import load_backbone
    from faceforge.train.config import config_from_dict

    if not (isinstance(angle, (int, float)) and math.isfinite(angle) and 0.0 < angle <= 180.0):
        raise ValueError(f"--angle {angle!r}; expected degrees in (0, 180]")
    checkpoint = run_checkpoint(run)
    where = str(run)
    state = resolve(load_checkpoint(checkpoint), checkpoint.parent)  # row shards assembled whole
    if "config" not in state or "backbone" not in state:
        raise ValueError(f"{where}: not a `faceforge train` checkpoint (no 'config' / 'backbone' entry)")
    cfg = config_from_dict(state["config"], source=str(checkpoint))
    weight = subcentre_weight(state, cfg.head.name, where)
    cfg.output = str(checkpoint.parent)  # an image folder's label map is the run's own
    dataset = _training_set(cfg, data, where)
    if int(dataset.num_classes) > weight.shape[0]:
        raise ValueError(f"{data or where}: {int(dataset.num_classes)} classes; the run's head has {weight.shape[0]}: "
                         "expected the data the run trained on")
    backbone, _ = load_backbone(state, source=str(checkpoint), trust_code=trust_code)
    embeddings, labels = _embed(backbone, dataset, batch_size)
    keep, dominant, to_dominant = select_clean(embeddings, labels, weight, angle)
    labels_np = labels.numpy()
    result = CleanResult(kept=np.flatnonzero(keep.numpy()), dropped=np.flatnonzero(~keep.numpy()),
                         dominant=dominant.numpy(), angles=to_dominant.numpy(), labels=labels_np,
                         num_classes=int(weight.shape[0]), angle=float(angle), flipped=_flipped(dataset))
    if write:
        prefix = Path(out) if out is not None else checkpoint.parent / "cleaned"
        prefix = prefix.with_suffix("") if prefix.suffix in (".rec", ".idx") else prefix
        _write(prefix, dataset, result.kept, labels_np, result.num_classes)
        result.files = {"rec": f"{prefix}.rec", "idx": f"{prefix}.idx", "report": f"{prefix}.json"}
        write_bytes(Path(f"{prefix}.json"), json.dumps(result.report(), indent=1).encode())
    return result


def _flipped(dataset: Any) -> np.ndarray | None:
    """The samples whose label ``data.label_noise`` changed (``train.data.LabelNoise``), None for other sets."""
    clean = getattr(dataset, "clean_labels", None)
    noisy = getattr(dataset, "labels", None)
    if clean is None or noisy is None:
        return None
    return np.flatnonzero(np.asarray(clean) != np.asarray(noisy))
