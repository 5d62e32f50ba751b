"""Evaluation: top-1, top-5, per-class accuracy, the confusion matrix and calibration (NLL, expected calibration error
over 15 confidence bins, the reliability diagram's bins), summed over ranks when distributed; and re-evaluation of an
exported student with exactly the preprocessing recorded in its config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from meal_ray.config import INTERPOLATIONS, DataConfig
from meal_ray.data.crops import EvalTransform
from meal_ray.data.datasets import load_datasets
from meal_ray.data.loaders import EvalView, Normalize
from meal_ray.errors import ConfigError
from meal_ray.models import load_export, model_data_config


@dataclass
class EvalResult:
    top1: float
    top5: float
    per_class: list = field(default_factory=list)  # accuracy (%) per class
    confusion: list = field(default_factory=list)  # confusion[true][pred] counts
    count: int = 0
    nll: float = 0.0  # mean negative log-likelihood of the true class (nats)
    ece: float = 0.0  # expected calibration error: sum over bins of |accuracy - mean confidence| x bin share
    reliability: dict = field(default_factory=dict)  # per confidence bin: count, mean confidence, accuracy

    def to_dict(self, class_names: Optional[Sequence[str]] = None) -> dict:
        d = asdict(self)
        if class_names:
            d["per_class"] = {n: a for n, a in zip(class_names, self.per_class)}
        return d


CALIBRATION_BINS = 15  # equal-width confidence bins (Guo et al. 2017)


@torch.no_grad()
def evaluate(predict: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, num_classes: int,
             device: torch.device | str = "cpu", outputs: str = "logits") -> EvalResult:
    """``predict(uint8 images) -> [B, C]`` over (images, labels) batches; ``outputs`` says whether it returns logits
    or probabilities (an ensemble's average), which calibration needs to know."""
    if outputs not in ("logits", "probs"):
        raise ValueError(f"outputs={outputs!r}: logits or probs")
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    top5_hits = torch.zeros((), dtype=torch.int64, device=device)
    # per bin: count, summed confidence, correct predictions; then the summed NLL in the last slot
    bins = torch.zeros(3 * CALIBRATION_BINS + 1, dtype=torch.float64, device=device)
    k = min(5, num_classes)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        scores = predict(images).float()
        log_probs = F.log_softmax(scores, dim=1) if outputs == "logits" else scores.clamp_min(1e-12).log()
        top = scores.topk(k, dim=1).indices
        confusion += torch.bincount(labels * num_classes + top[:, 0],
                                    minlength=num_classes ** 2).view(num_classes, num_classes)
        top5_hits += (top == labels[:, None]).any(dim=1).sum()
        confidence = log_probs.gather(1, top[:, :1]).squeeze(1).exp().double()
        which = (confidence * CALIBRATION_BINS).long().clamp(max=CALIBRATION_BINS - 1)
        n = CALIBRATION_BINS
        bins[:n] += torch.bincount(which, minlength=n).double()
        bins[n:2 * n] += torch.bincount(which, weights=confidence, minlength=n)
        bins[2 * n:3 * n] += torch.bincount(which, weights=(top[:, 0] == labels).double(), minlength=n)
        bins[-1] -= log_probs.gather(1, labels[:, None]).double().sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(confusion)
        dist.all_reduce(top5_hits)
        dist.all_reduce(bins)
    confusion, bins = confusion.cpu(), bins.cpu()
    count = int(confusion.sum())
    per_class_total = confusion.sum(dim=1).clamp(min=1)
    n = CALIBRATION_BINS
    counts, confidences, corrects = bins[:n], bins[n:2 * n], bins[2 * n:3 * n]
    filled = counts.clamp(min=1)
    return EvalResult(
        top1=100.0 * float(confusion.diag().sum()) / max(count, 1),
        top5=100.0 * float(top5_hits) / max(count, 1),
        per_class=(100.0 * confusion.diag().float() / per_class_total).tolist(),
        confusion=confusion.tolist(),
        count=count,
        nll=float(bins[-1]) / max(count, 1),
        ece=float((corrects - confidences).abs().sum()) / max(count, 1),
        reliability={"count": counts.long().tolist(), "confidence": (confidences / filled).tolist(),
                     "accuracy": (corrects / filled).tolist()},
    )


def evaluate_model(model: torch.nn.Module, normalize: torch.nn.Module, loader: Iterable, num_classes: int,
                   device: torch.device | str = "cpu") -> EvalResult:
    was_training = model.training
    model.eval()
    try:
        return evaluate(lambda x: model(normalize(x)), loader, num_classes, device)
    finally:
        model.train(was_training)


def evaluate_export(model_dir: str, dataset: str = "fashion-mnist", root: Optional[str] = None,
                    batch_size: int = 256, val_subset: Optional[int] = None) -> tuple[EvalResult, tuple]:
    """Evaluate a meal-ray export on ``dataset``'s validation/test split with its config.json preprocessing."""
    if dataset == "imagefolder" and not root:
        raise ConfigError("--root is required with --dataset imagefolder: the folder holding val/<class>/<images>.")
    model = load_export(model_dir)
    dc = model_data_config(model)
    interp = dc.get("interpolation", "bilinear")
    data_cfg = DataConfig(dataset=dataset, root=root, image_size=int(dc["input_size"][-1]),
                          crop_pct=float(dc.get("crop_pct", 0.875)), mean=tuple(dc["mean"]), std=tuple(dc["std"]),
                          interpolation=interp if interp in INTERPOLATIONS else "bilinear", val_subset=val_subset)
    data_cfg.validate()
    _, val, classes = load_datasets(data_cfg, model.num_classes)
    loader = DataLoader(EvalView(val, EvalTransform(data_cfg.image_size, data_cfg.crop_pct, data_cfg.interpolation)),
                        batch_size=batch_size)
    result = evaluate_model(model, Normalize(data_cfg.mean, data_cfg.std), loader, model.num_classes,
                            torch.device("cpu"))
    return result, classes
