"""Soft labels from an offline cache (``meal-ray relabel``): distillation with no teacher running.

The source decides the crops too: its crop sampler replays, in epoch ``e``, the crops (and
CutMix partners and boxes) recorded in pass ``e mod P``; epochs beyond the cache's passes
replay the passes again, as FKD does. Soft labels are looked up by sample id, so any worker
count and batch size can read a cache.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from meal_ray.cache import CachedPass, CacheSpec, SoftLabelCache
from meal_ray.config import JobConfig
from meal_ray.data.crops import CropParams, MixParams
from meal_ray.data.datasets import dataset_fingerprint, load_datasets, sample_ids
from meal_ray.ensemble import TeacherSet
from meal_ray.errors import CacheError


def job_cache_spec(cfg: JobConfig, train=None, k: Optional[int] = None, passes: int = 0,
                   teacher_set: Optional[dict] = None) -> CacheSpec:
    """What a cache must hold for ``cfg`` (teacher set, data, classes, image size, crops, CutMix). ``teacher_set``:
    what a Serve application reports it serves (relabelling from served teachers), else described from the files."""
    if train is None:
        train, _, _ = load_datasets(cfg.data, cfg.student.num_classes)
    if teacher_set is None:
        teachers = TeacherSet.from_config(cfg.teachers)
        teacher_set = {"fingerprint": teachers.fingerprint(), "autocast": teachers.autocast,
                       "teachers": teachers.describe()}
    d = cfg.data
    return CacheSpec(
        teacher_set={k: teacher_set[k] for k in ("fingerprint", "autocast", "teachers")},
        dataset={"fingerprint": dataset_fingerprint(train), "name": d.dataset, "train_subset": d.train_subset},
        num_classes=cfg.student.num_classes, image_size=d.image_size,
        crop={"scale": list(d.crop_scale), "ratio": [round(float(r), 6) for r in d.crop_ratio],
              "interpolation": d.interpolation},
        cutmix=cutmix_spec(cfg.optim), k=int(k or cfg.student.num_classes), passes=int(passes), seed=int(cfg.run.seed))


def cutmix_spec(optim) -> dict:
    """The CutMix settings a cache records (and a job must match)."""
    if not optim.cutmix:
        return {"enabled": False}
    return {"enabled": True, "beta": float(optim.cutmix_beta), "prob": float(optim.cutmix_prob)}


class CacheReplaySampler:
    """Crop sampler replaying a cache: the crop and CutMix record of sample ``sid`` in pass ``epoch % passes``."""

    replays_mix = True

    def __init__(self, cache: SoftLabelCache):
        self.cache, self.passes = cache, cache.spec.passes
        self._pass: Optional[int] = None
        self._data: Optional[CachedPass] = None

    def load(self, epoch: int) -> CachedPass:
        p = epoch % self.passes
        if self._pass != p:
            self._data, self._pass = self.cache.load_pass(p), p
        return self._data

    def sample(self, image: torch.Tensor, sample_id: int, epoch: int = 0) -> CropParams:
        data = self.load(epoch)
        return _crop(data.crops[data.row(sample_id)])

    def mix(self, sample_id: int, epoch: int = 0) -> Optional[MixParams]:
        data = self.load(epoch)
        row = data.row(sample_id)
        if data.mix_ids[row] < 0:
            return None
        return MixParams(int(data.mix_ids[row]), _crop(data.mix_crops[row]), tuple(data.mix_boxes[row].tolist()))


def _crop(values: np.ndarray) -> CropParams:
    top, left, height, width, flip = values.tolist()  # plain ints, in one call (a replayed epoch does this per crop)
    return CropParams(top, left, height, width, bool(flip))


class CachedSoftLabels:
    """Soft labels read from a soft-label cache (``teachers.cache``), for exactly the replayed crops."""

    name = "cache"

    def __init__(self, cache: SoftLabelCache, num_classes: int, recovery: str = "marginal",
                 top_k: Optional[int] = None):
        self.cache, self.num_classes, self.recovery, self.top_k = cache, num_classes, recovery, top_k
        self.sampler = CacheReplaySampler(cache)

    @classmethod
    def check_config(cls, cfg: JobConfig) -> None:
        """The cache exists, is complete and fits the job (teachers, data, classes, size, crops, samples)."""
        cache = SoftLabelCache(cfg.teachers.cache)
        train, _, _ = load_datasets(cfg.data, cfg.student.num_classes)
        cache.check_job(job_cache_spec(cfg, train), sample_ids(train))
        if cfg.teachers.cache_top_k is not None and cfg.teachers.cache_top_k > cache.spec.k:
            raise CacheError(f"teachers.cache_top_k={cfg.teachers.cache_top_k} but the cache at {cache.root} holds "
                             f"only the top {cache.spec.k} classes per crop; use <= {cache.spec.k} or relabel with "
                             "a larger --top-k.")

    @classmethod
    def preflight(cls, cfg: JobConfig) -> None:
        pass  # nothing remote: check_config saw everything

    @classmethod
    def from_config(cls, cfg: JobConfig, device=None) -> "CachedSoftLabels":
        return cls(SoftLabelCache(cfg.teachers.cache), cfg.student.num_classes, cfg.teachers.cache_recovery,
                   cfg.teachers.cache_top_k)

    def crop_sampler(self) -> CacheReplaySampler:
        return self.sampler

    def attach(self, batches: Iterable) -> Iterator:
        for batch in batches:
            start = time.perf_counter()
            data = self.sampler.load(batch.epoch)
            rows = data.rows(batch.indices.tolist())
            if not np.array_equal(data.crops[rows], batch.crops.numpy()):
                raise CacheError("the batch's crops are not the ones in the soft-label cache: train with the "
                                 "cache's crop sampler (the cache source's crop_sampler()).")
            probs, logits = data.soft_labels(rows, self.num_classes, self.recovery, self.top_k)
            yield replace(batch, teacher_probs=probs, teacher_logits=logits, wait_s=time.perf_counter() - start)

    def close(self) -> None:
        pass
