"""Re-evaluate an exported student with exactly the preprocessing recorded in its config.json."""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader

from meal_ray.config import DataConfig
from meal_ray.data import EvalTransform, EvalView, Normalize, load_datasets
from meal_ray.evaluation import EvalResult, evaluate_model
from meal_ray.models import load_export, model_data_config


def evaluate_export(model_dir: str, dataset: str = "fashion-mnist", root: Optional[str] = None,
                    batch_size: int = 256, val_subset: Optional[int] = None) -> tuple[EvalResult, tuple]:
    model = load_export(model_dir)
    dc = model_data_config(model)
    interp = dc.get("interpolation", "bilinear")
    data_cfg = DataConfig(dataset=dataset, root=root, image_size=int(dc["input_size"][-1]),
                          crop_pct=float(dc.get("crop_pct", 0.875)), mean=tuple(dc["mean"]), std=tuple(dc["std"]),
                          interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
                          val_subset=val_subset)
    data_cfg.validate()
    _, val, classes = load_datasets(data_cfg, model.num_classes)
    loader = DataLoader(EvalView(val, EvalTransform(data_cfg.image_size, data_cfg.crop_pct, data_cfg.interpolation)),
                        batch_size=batch_size)
    return evaluate_model(model, Normalize(data_cfg.mean, data_cfg.std), loader, model.num_classes, torch.device("cpu")), classes
