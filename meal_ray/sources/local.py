"""In-process teachers on the train worker's device: the authors' way, and the baseline for ``served``."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Iterable, Iterator

import torch

from meal_ray.config import JobConfig
from meal_ray.data.batch import Batch
from meal_ray.ensemble import TeacherEnsemble, TeacherSet


class LocalSoftLabels:
    """A TeacherEnsemble in this process; soft labels are computed synchronously before each step."""

    name = "local"

    def __init__(self, ensemble: TeacherEnsemble, device: torch.device | str = "cpu"):
        self.ensemble = ensemble.to(device)
        self.device = device

    @classmethod
    def check_config(cls, cfg: JobConfig) -> None:
        TeacherSet.from_config(cfg.teachers).check_files()

    @classmethod
    def preflight(cls, cfg: JobConfig) -> None:
        pass  # the workers build the ensemble and check it against the student (from_config)

    @classmethod
    def from_config(cls, cfg: JobConfig, device) -> "LocalSoftLabels":
        ensemble = TeacherSet.from_config(cfg.teachers).load()
        ensemble.check_student(cfg.student.num_classes, cfg.data.in_chans)
        return cls(ensemble, device)

    def attach(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        for batch in batches:
            start = time.perf_counter()
            probs, logits = self.ensemble(batch.images.to(self.device))
            probs, logits = probs.clone(), logits.clone()  # leave inference mode: usable in autograd
            elapsed = time.perf_counter() - start
            yield replace(batch, teacher_probs=probs, teacher_logits=logits, wait_s=elapsed, teacher_latency_s=elapsed)

    def crop_sampler(self) -> None:
        return None  # random crops, drawn by the train loader

    def close(self) -> None:
        pass
