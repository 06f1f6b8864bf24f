"""The distillation objective (BigFace-Distill): the head's loss plus lambda x angular distillation.

    objective:
      name: distillation
      kwargs: {teacher: runs/r600/last.pt, lam: 9.0}      # or teacher: w600k_r50.onnx

For each micro-batch (``faceforge.data.samplers.Batch``) the student embeds the images; the teacher
(``faceforge.train.teacher``: frozen, eval mode, outside DDP and the optimiser, no gradient) embeds the SAME
augmented images (masked and flipped as the student saw them); the terms are

    classification = head(x_s, y)                  over the labelled images (CosFace s 64, m 0.4 in BigFace)
    distillation   = lam * mean_i ||x̂_t,i - x̂_s,i||^2   over every image, labelled or not (faceforge.distill)

and the trainer logs each by name and minimises their sum. Unlabelled images (``data.unlabelled``, label
-1) feed the distillation term only: semi-supervised KD.

Options (``objective.kwargs``):
    teacher: a faceforge checkpoint / run folder, or an ``.onnx`` file (required).
    lam: lambda on the squared-distance form (default 9.0, BigFace; = 18 on ``1 - cos``).
    teacher_dtype: ``float32`` (default) or ``bfloat16`` (a checkpoint teacher's weights and inputs).
    projection: a learned linear map (no bias) from the student's width to the teacher's, trained with the
        head's optimiser group. Default: on exactly when the widths differ; ``false`` with different widths
        is an error. Logged when the run starts.
    cache: a folder for the memory-mapped teacher-embedding cache (``faceforge.train.teacher_cache``);
        default none (the teacher runs on every batch).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from faceforge.data.samplers import Batch, SamplerContext
from faceforge.distill import AngularDistillation
from faceforge.train.objectives import OBJECTIVES, Objective, for_head
from faceforge.train.teacher import Teacher, load_teacher
from faceforge.train.teacher_cache import TeacherCache, dataset_fingerprint

__all__ = ["Distillation"]

logger = logging.getLogger("faceforge.train")


def _student_width(backbone: nn.Module, head: nn.Module) -> int:
    for part in (backbone, head):
        width = getattr(part, "embedding_size", None)
        if isinstance(width, int):
            return width
    raise ValueError("distillation: the student's embedding size is unknown (neither the backbone nor the head "
                     "has an int `embedding_size`)")


@OBJECTIVES.register("distillation")  # imported by faceforge.train.config, which gathers the registries
class Distillation(Objective):
    """``{"classification": head(x_s, y), "distillation": lam * mean ||x̂_t - x̂_s||^2}`` (module doc)."""

    uses_unlabelled = True

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        amp_dtype: torch.dtype | None = None,
        *,
        teacher: str | Teacher,
        lam: float = 9.0,
        teacher_dtype: str = "float32",
        projection: bool | None = None,
        cache: str | None = None,
    ) -> None:
        super().__init__(backbone, head, amp_dtype)
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or lam < 0:
            raise ValueError(f"objective.kwargs.lam = {lam!r}: expected a float >= 0")
        if projection not in (None, True, False):
            raise ValueError(f"objective.kwargs.projection = {projection!r}: expected true, false or null (auto)")
        model = teacher if isinstance(teacher, Teacher) else load_teacher(teacher, teacher_dtype)
        self.owned["teacher"] = model  # not trained, outside DDP; its weights stay in its own file
        self.distill = AngularDistillation(lam)
        student, target = _student_width(backbone, head), model.embedding_size
        if projection is False and student != target:
            raise ValueError(f"objective.kwargs.projection = false, but the student's embeddings are {student}-D and "
                             f"the teacher's {target}-D; expected true (or null) for a learned projection")
        if projection or (projection is None and student != target):
            self.learned["projection"] = nn.Linear(student, target, bias=False)
        self.cache_folder = cache
        self.cache: TeacherCache | None = None
        self.description = (
            f"distillation: {model.describe()}; student D = {student}; projection "
            f"{f'learned {student} -> {target}' if 'projection' in self.learned else 'none'}; lambda {lam:g}; "
            f"teacher cache {cache or 'none'}"
        )
        self._announced = False

    @property
    def teacher(self) -> Teacher:
        return self.owned["teacher"]  # type: ignore[return-value]

    def bind(self, context: SamplerContext) -> None:
        """Open the teacher-embedding cache (when ``cache`` is set), keyed by the training data and seed."""
        if self.cache_folder is None:
            return
        n = len(context.dataset) + (len(context.unlabelled) if context.unlabelled is not None else 0)  # type: ignore[arg-type]
        key = {
            "teacher": self.teacher.identity(),
            "dataset": dataset_fingerprint(context.dataset),
            "unlabelled": dataset_fingerprint(context.unlabelled),
            "seed": context.seed,
        }
        self.cache = TeacherCache(self.cache_folder, key, rows=2 * n, dim=self.teacher.embedding_size)
        self.description += f" ({self.cache.base}, {2 * n} views)"

    def teacher_embeddings(self, batch: Batch) -> Tensor:
        """(B, D_t) float32 teacher embeddings of the batch's images, from the cache where it has them."""
        if self.cache is None:
            return self.teacher(batch.images)
        views = batch.view_ids()
        masked = batch.altered()  # masked or augmented: not the image its view id names
        found, out = self.cache.lookup(views)
        found &= ~masked
        # Two teacher calls, the altered images and the others not cached yet: each call's images depend only
        # on the data order, the augmentations and what the cache held at that step, so a resumed run repeats them.
        for part, store in ((masked, False), (~masked & ~found, True)):
            if part.any():
                computed = self.teacher(batch.images[part.to(batch.images.device)]).cpu()
                out[part] = computed
                if store:
                    self.cache.store(views[part], computed)
        return out.to(batch.images.device)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        if not self._announced:  # at the first batch, when the run's log is open
            logger.info("%s", self.description)
            self._announced = True
        student = for_head(self.embed(batch.images))
        labelled = batch.labels >= 0
        if bool(labelled.all()):
            classification = self.head(student, batch.labels)
        else:  # unlabelled images (label -1) feed the distillation term only
            classification = self.head(student[labelled], batch.labels[labelled])
        with torch.no_grad():
            target = self.teacher_embeddings(batch)
        if "projection" in self.learned:
            student = self.learned["projection"](student)
        return {"classification": classification, "distillation": self.distill(student, target)}

    # the teacher's weights stay in the teacher's own file: checkpoints hold the learned projection only
    def owned_state_dict(self) -> dict[str, Any]:
        return {f"learned.{k}": v for k, v in self.learned.state_dict().items()}

    def load_owned_state_dict(self, state: dict[str, Any]) -> None:
        self.learned.load_state_dict({k.removeprefix("learned."): v for k, v in state.items() if k.startswith("learned.")})
