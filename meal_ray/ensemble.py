"""Frozen teachers and their ensemble: each teacher preprocesses the shared uint8 crop its own way."""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from meal_ray.errors import ClassCountMismatchError
from meal_ray.models import create_model, model_data_config

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Teacher(nn.Module):
    """A frozen model plus its own preprocessing (input size, mean/std, interpolation from its timm data config)."""

    def __init__(self, model: nn.Module, data_config: Optional[dict] = None, autocast: Optional[str] = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        cfg = data_config or model_data_config(model)
        self.in_chans, height, width = (int(v) for v in cfg["input_size"])
        self.size = (height, width)
        self.interpolation = cfg.get("interpolation", "bilinear")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            self.interpolation = "bilinear"
        self.register_buffer("mean", torch.tensor(cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(cfg["std"], dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.num_classes = getattr(model, "num_classes", None)
        self.autocast = autocast

    def train(self, mode: bool = True):  # teachers stay in eval mode whatever their parent does
        return super().train(False)

    def preprocess(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float normalized at this teacher's input size."""
        if crops.dtype != torch.uint8 or crops.ndim != 4:
            raise ValueError(f"teacher input must be uint8 [B, C, H, W], got {crops.dtype} {tuple(crops.shape)}.")
        if crops.shape[1] != self.in_chans:
            raise ClassCountMismatchError(
                f"crops have {crops.shape[1]} channels but this teacher expects {self.in_chans}; "
                "use teachers trained on the same kind of images as the student."
            )
        x = crops.to(self.mean.device).float()
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode=self.interpolation,
                              antialias=self.interpolation != "nearest",
                              **({} if self.interpolation == "nearest" else {"align_corners": False}))
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(crops)
        ctx = (torch.autocast(x.device.type, dtype=_AUTOCAST[self.autocast]) if self.autocast
               else contextlib.nullcontext())
        with ctx:
            return self.model(x).float()


def load_teacher(spec, autocast: Optional[str] = None, num_classes: Optional[int] = None,
                 in_chans: Optional[int] = None) -> Teacher:
    """Build a Teacher from a TeacherSpec-like object (model, weights, pretrained)."""
    from meal_ray.models import is_export_dir, read_export_config

    if spec.weights and is_export_dir(spec.weights):
        cfg = read_export_config(spec.weights)
        num_classes = cfg["num_classes"] if num_classes is None else num_classes
        in_chans = cfg.get("model_args", {}).get("in_chans", 3) if in_chans is None else in_chans
    model = create_model(spec.model, num_classes=num_classes or 1000, in_chans=in_chans or 3,
                         pretrained=spec.pretrained, weights=spec.weights)
    return Teacher(model, autocast=autocast)


class TeacherEnsemble(nn.Module):
    """K frozen teachers: returns (mean of softmax probabilities, mean of logits) for a uint8 crop batch.

    The averaged probabilities are the distillation target; the averaged logits feed the
    discriminator (DESIGN.md section 1, as in the authors' code).
    """

    def __init__(self, teachers: Sequence[nn.Module], data_configs: Optional[Sequence[Optional[dict]]] = None,
                 autocast: Optional[str] = None):
        super().__init__()
        if not teachers:
            raise ValueError("TeacherEnsemble needs at least one teacher.")
        data_configs = data_configs or [None] * len(teachers)
        self.teachers = nn.ModuleList(
            t if isinstance(t, Teacher) else Teacher(t, c, autocast) for t, c in zip(teachers, data_configs)
        )
        classes = {t.num_classes for t in self.teachers}
        if len(classes) != 1:
            raise ClassCountMismatchError(f"teachers disagree on the number of classes: {sorted(classes)}.")
        self.num_classes = classes.pop()

    @classmethod
    def from_specs(cls, specs, autocast: Optional[str] = None, num_classes: Optional[int] = None,
                   in_chans: Optional[int] = None) -> "TeacherEnsemble":
        return cls([load_teacher(s, autocast, num_classes, in_chans) for s in specs])

    def check_student(self, num_classes: int, in_chans: int) -> None:
        """Raise a clear error when the student cannot be distilled from these teachers."""
        check_compatible(self.num_classes, {t.in_chans for t in self.teachers}, num_classes, in_chans)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.inference_mode()
    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = [t(crops) for t in self.teachers]
        return average_teacher_outputs(logits)


def average_teacher_outputs(logits: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """p_e = mean_t softmax(z_t), z_e = mean_t z_t (float32)."""
    probs = torch.stack([z.float().softmax(dim=1) for z in logits]).mean(0)
    return probs, torch.stack([z.float() for z in logits]).mean(0)


def check_compatible(teacher_classes: int, teacher_chans: set, num_classes: int, in_chans: int) -> None:
    if teacher_classes != num_classes:
        raise ClassCountMismatchError(
            f"the teachers predict {teacher_classes} classes but the student has {num_classes}; "
            f"set student.num_classes={teacher_classes} or use teachers trained on this dataset."
        )
    if teacher_chans != {in_chans}:
        raise ClassCountMismatchError(
            f"the teachers take {sorted(teacher_chans)} input channels but the data has {in_chans}; "
            "use teachers trained on the same kind of images (data.mean/std give one value per channel)."
        )
