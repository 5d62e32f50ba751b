"""Frozen teachers, their ensemble, and the TeacherSet that names them.

Each teacher preprocesses the shared uint8 crop its own way (input size, mean/std,
interpolation from its timm data config). A :class:`TeacherSet` is the list of teacher specs
plus a fingerprint of what produces the soft labels (architecture, weights content,
preprocessing, autocast), so a job, a Serve application and a soft-label cache can show they
use the same teachers without loading them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from meal_ray.config import INTERPOLATIONS, TeachersConfig, teacher_list
from meal_ray.errors import ClassCountMismatchError, ModelNotFoundError
from meal_ray.files import sha256_of
from meal_ray.models import (
    check_model_name,
    check_weights_fit,
    create_model,
    is_export_dir,
    model_data_config,
    read_export_config,
)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # teachers.autocast, run.amp


class Teacher(nn.Module):
    """A frozen model plus its own preprocessing (input size, mean/std, interpolation from its timm data config)."""

    def __init__(self, model: nn.Module, data_config: Optional[dict] = None, autocast: Optional[str] = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        cfg = data_config or model_data_config(model)
        self.in_chans, height, width = (int(v) for v in cfg["input_size"])
        self.size = (height, width)
        self.interpolation = cfg.get("interpolation", "bilinear")
        if self.interpolation not in INTERPOLATIONS:  # timm's "random"/"box" etc.: bilinear, as timm's eval does
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
        ctx = (torch.autocast(x.device.type, dtype=AUTOCAST_DTYPES[self.autocast]) if self.autocast
               else contextlib.nullcontext())
        with ctx:
            return self.model(x).float()


def load_teacher(spec, autocast: Optional[str] = None, num_classes: Optional[int] = None,
                 in_chans: Optional[int] = None) -> Teacher:
    """Build a Teacher from a TeacherSpec-like object (model, weights, pretrained)."""
    if spec.weights and is_export_dir(spec.weights):
        cfg = read_export_config(spec.weights)
        num_classes = cfg["num_classes"] if num_classes is None else num_classes
        in_chans = cfg.get("model_args", {}).get("in_chans", 3) if in_chans is None else in_chans
    # random weights (a rehearsal: pretrained false, no weights) from one fixed seed, so every replica of a teacher and
    # the in-process ensemble build the same network and the run stays deterministic
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model(spec.model, num_classes=num_classes or 1000, in_chans=in_chans or 3,
                             pretrained=spec.pretrained, weights=spec.weights)
    return Teacher(model, data_config=teacher_data_config(spec), autocast=autocast)


def teacher_data_config(spec) -> dict:
    """The preprocessing a teacher applies, resolved from its export's config.json or timm's pretrained cfg, without
    building the model (what :func:`load_teacher` gives the Teacher, so the fingerprint describes what runs)."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    if spec.weights and is_export_dir(spec.weights):
        pretrained_cfg = read_export_config(spec.weights).get("pretrained_cfg", {})
    else:
        found = get_pretrained_cfg(spec.model)
        pretrained_cfg = found.to_dict() if found is not None else {}
    return resolve_data_config(pretrained_cfg=dict(pretrained_cfg) or {"input_size": (3, 224, 224)})


_HASHES: dict = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's content (cached per path, size and mtime: teacher weights are hashed once per process)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_of(p)
    return _HASHES[key]


def weights_file(spec) -> Optional[Path]:
    """The file holding a spec's weights (an export's model.safetensors, or the weights file), None for timm's."""
    if not spec.weights:
        return None
    p = Path(os.path.expanduser(str(spec.weights)))
    return p / "model.safetensors" if is_export_dir(p) else p


def describe_teacher(spec) -> dict:
    """What makes a teacher's soft labels: architecture, weights content, preprocessing (not its deployment name)."""
    path = weights_file(spec)
    if path is not None:
        if not path.is_file():
            raise ModelNotFoundError(f"teacher {spec.model!r}: weights {spec.weights!r} not found (looked at {path}). "
                                     "Give a meal-ray export directory or a weights file that exists here.")
        weights = f"sha256:{file_sha256(path)}"
    else:
        weights = "timm-pretrained" if spec.pretrained else "random-init"
    dc = teacher_data_config(spec)
    return {"model": spec.model, "weights": weights, "input_size": [int(v) for v in dc["input_size"]],
            "mean": [round(float(v), 6) for v in dc["mean"]], "std": [round(float(v), 6) for v in dc["std"]],
            "interpolation": dc.get("interpolation", "bilinear")}


def fingerprint(descriptions: Sequence[dict], autocast: Optional[str] = None) -> str:
    """Short stable hash of a teacher set's descriptions (order matters: the average does not, the records do)."""
    blob = json.dumps({"teachers": list(descriptions), "autocast": autocast}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _set_differences(ours: list, theirs: list, ours_name: str, theirs_name: str, autocast: tuple) -> list:
    """What differs between two teacher sets as a whole: autocast, and the count (then their models are listed)."""
    out = []
    if autocast[0] != autocast[1]:
        out.append(f"autocast: {ours_name} {autocast[0]}, {theirs_name} {autocast[1]}")
    if len(ours) != len(theirs):
        out.append(f"{ours_name} has {len(ours)} teachers ({', '.join(ours)}), {theirs_name} has {len(theirs)} "
                   f"({', '.join(theirs)})")
    return out


def served_differences(specs: Sequence, served: Sequence[dict], autocast: tuple = (None, None)) -> list:
    """How a job's teachers (TeacherSpecs) differ from what a Serve application reports it serves (its replicas'
    ``info()``), without reading any weights here: the architecture must be the same, and the weights the same by name
    (as the Serve config wrote them, or the same absolute path, or ``sha256:<hex>`` of the file the replica loaded)
    or both timm-pretrained / both random."""
    out = _set_differences([s.model for s in specs], [t["model"] for t in served], "job", "served", autocast)
    if len(specs) != len(served):
        return out
    for i, (spec, info) in enumerate(zip(specs, served)):
        if spec.model != info["model"]:
            out.append(f"teacher {i} model: job {spec.model}, served {info['model']}")
            continue
        digest = str((info.get("description") or {}).get("weights", ""))
        if not _same_weights(spec, info, digest):
            out.append(f"teacher {i} weights: job {_weights_name(spec.weights, spec.pretrained)}, served "
                       f"{_weights_name(info.get('weights_given'), info.get('pretrained'))}"
                       + (f" ({digest[:19]})" if digest.startswith("sha256:") else ""))
    return out


def _same_weights(spec, info: dict, digest: str) -> bool:
    if not spec.weights:
        return not info.get("weights") and bool(spec.pretrained) == bool(info.get("pretrained"))
    given = str(spec.weights)
    if given.startswith("sha256:"):
        return len(given) >= 19 and digest.startswith(given)
    if given == info.get("weights_given"):
        return True
    return bool(info.get("weights")) and os.path.abspath(os.path.expanduser(given)) == info["weights"]


def _weights_name(weights, pretrained) -> str:
    return repr(str(weights)) if weights else ("timm-pretrained" if pretrained else "random-init")


@dataclass(frozen=True)
class TeacherSet:
    """The teachers of a job (or a Serve application / a soft-label cache): specs in order, plus autocast."""

    specs: tuple
    autocast: Optional[str] = None

    @classmethod
    def from_config(cls, teachers: TeachersConfig) -> "TeacherSet":
        return cls(tuple(teacher_list(teachers.models)), teachers.autocast)

    def check_files(self, fit: bool = True) -> None:
        """Model names and weights files exist (before Ray starts or any teacher is loaded) and, with ``fit``, are
        readable weights for their architecture."""
        for spec in self.specs:
            check_model_name(spec.model)
            path = weights_file(spec)
            if path is not None and not path.exists():
                raise ModelNotFoundError(
                    f"teacher {spec.model!r}: weights {spec.weights!r} not found (looked at {path.resolve()}). "
                    "Give a meal-ray export directory (model.safetensors + config.json) or a weights file; "
                    "produce Fashion-MNIST teachers with `meal-ray pretrain --config jobs/fmnist-teacher-<arch>.yaml`.")
            if fit and path is not None and path.exists():
                check_weights_fit(spec.model, Path(os.path.expanduser(str(spec.weights))))

    def describe(self) -> list:
        self.check_files(fit=False)  # the job's check_config did the full check; this hashes the files anyway
        return [describe_teacher(s) for s in self.specs]

    def fingerprint(self) -> str:
        return fingerprint(self.describe(), self.autocast)

    def load(self, num_classes: Optional[int] = None, in_chans: Optional[int] = None) -> "TeacherEnsemble":
        return TeacherEnsemble([load_teacher(s, self.autocast, num_classes, in_chans) for s in self.specs])


class TeacherEnsemble(nn.Module):
    """K frozen teachers: returns (mean of softmax probabilities, mean of logits) for a uint8 crop batch.

    The averaged probabilities are the distillation target; the averaged logits feed the
    discriminator (as in the authors' code).
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
        return TeacherSet(tuple(teacher_list(specs)), autocast).load(num_classes, in_chans)

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


def top_k_soft_labels(probs: torch.Tensor, logits: torch.Tensor, k: int) -> tuple:
    """The ``k`` largest of p_e per sample, sorted: (ids int64 [B, k], probs [B, k], logits [B, k], rest [B]), where
    rest is the mean logit of the other classes (0 when k covers them all); what a cache row or a top-k reply holds."""
    num_classes = probs.shape[1]
    k = min(k, num_classes)
    top = probs.float().topk(k, dim=1)
    top_logits = logits.float().gather(1, top.indices)
    rest = ((logits.float().sum(1) - top_logits.sum(1)) / (num_classes - k) if k < num_classes
            else torch.zeros(len(probs)))
    return top.indices, top.values, top_logits, rest


def expand_top_k(ids: torch.Tensor, top_p: torch.Tensor, top_z: torch.Tensor, rest: torch.Tensor,
                 num_classes: int, recovery: str = "marginal") -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, logits) float32 [B, C] from a top-k record; exact when k == C. The mass left over goes evenly to the
    other classes (``marginal``, FKD's smoothing) or the k probabilities are renormalized (``renormalize``); every
    other class gets the rest logit, so the logits still average to z_e's mean."""
    b, k = ids.shape
    top_p, top_z = top_p.float(), top_z.float()
    if k < num_classes:
        mass = (1.0 - top_p.sum(1, keepdim=True)).clamp(min=0.0)
        if recovery == "renormalize":
            probs = torch.zeros(b, num_classes)
            top_p = top_p / top_p.sum(1, keepdim=True).clamp(min=1e-12)
        else:
            probs = (mass / (num_classes - k)).expand(b, num_classes).clone()
        logits = rest.float().view(b, 1).expand(b, num_classes).clone()
    else:
        probs = torch.zeros(b, num_classes)
        logits = torch.zeros(b, num_classes)
    probs.scatter_(1, ids, top_p)
    logits.scatter_(1, ids, top_z)
    return probs, logits


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
