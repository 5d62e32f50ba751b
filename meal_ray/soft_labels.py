"""Soft-label sources: where (p_e, z_e) for exactly this batch's crops come from.

Every source turns an iterator of uint8 batches into the same batches annotated with the
teachers' averaged probabilities and logits, so one training loop serves all of them:
``none`` (hard-label pretraining), ``local`` (in-process TeacherEnsemble, the authors' way)
and ``served`` (Ray Serve, in :mod:`meal_ray.serving`), built on :class:`PrefetchWindow`.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Optional

import torch


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, C, H, W], what student *and* teachers see
    labels: torch.Tensor  # int64 [B]
    indices: Optional[torch.Tensor] = None  # sample ids in the dataset
    crops: Optional[torch.Tensor] = None  # int64 [B, 5]: top, left, height, width, flip
    labels_b: Optional[torch.Tensor] = None  # CutMix partner labels
    lam: float = 1.0  # CutMix: fraction of the image from the original sample
    teacher_probs: Optional[torch.Tensor] = None  # p_e [B, C]
    teacher_logits: Optional[torch.Tensor] = None  # z_e [B, C]
    wait_s: float = 0.0  # time the training loop blocked waiting for these soft labels
    teacher_latency_s: Optional[float] = None  # teacher inference time reported by the source


def batches_from_loader(loader: Iterable) -> Iterator[Batch]:
    for images, labels, indices, crops in loader:
        yield Batch(images, labels, indices, crops)


def cutmix(batch: Batch, beta: float = 1.0, prob: float = 1.0, generator: Optional[torch.Generator] = None) -> Batch:
    """CutMix on the uint8 batch *before* the teachers see it, so teacher and student share the mixed image."""
    if prob <= 0 or float(torch.rand((), generator=generator)) >= prob:
        return batch
    b, _, h, w = batch.images.shape
    lam = float(torch.distributions.Beta(beta, beta).sample())
    perm = torch.randperm(b, generator=generator)
    cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    cy, cx = int(torch.randint(h, (), generator=generator)), int(torch.randint(w, (), generator=generator))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    images = batch.images.clone()
    images[:, :, y0:y1, x0:x1] = batch.images[perm, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return replace(batch, images=images, labels_b=batch.labels[perm], lam=lam)


class NoSoftLabels:
    """Hard-label training (pretraining stage): batches pass through untouched."""

    name = "none"

    def attach(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        yield from batches

    def close(self) -> None:
        pass


class LocalSoftLabels:
    """In-process TeacherEnsemble on the worker's device: the authors' way, and the baseline for `served`."""

    name = "local"

    def __init__(self, ensemble, device: torch.device | str = "cpu"):
        self.ensemble = ensemble.to(device)
        self.device = device

    def attach(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        for batch in batches:
            start = time.perf_counter()
            probs, logits = self.ensemble(batch.images.to(self.device))
            probs, logits = probs.clone(), logits.clone()  # leave inference mode: usable in autograd
            elapsed = time.perf_counter() - start
            yield replace(batch, teacher_probs=probs, teacher_logits=logits, wait_s=elapsed, teacher_latency_s=elapsed)

    def close(self) -> None:
        pass


class PrefetchWindow:
    """Keep up to ``window`` soft-label requests in flight so teacher inference overlaps the student step.

    ``submit(batch)`` starts a request and returns a handle; ``collect(handle)`` blocks for
    its result ``(probs, logits, latency_s)``. Order is preserved. ``wait_s`` is the time the
    consumer actually blocked on ``collect``.
    """

    def __init__(self, submit: Callable[[Batch], Any], collect: Callable[[Any], tuple], window: int = 4):
        self.submit, self.collect, self.window = submit, collect, max(1, window)

    def attach(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        pending: collections.deque = collections.deque()
        it = iter(batches)
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.window:
                try:
                    batch = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((batch, self.submit(batch)))
            if not pending:
                return
            batch, handle = pending.popleft()
            start = time.perf_counter()
            probs, logits, latency = self.collect(handle)
            waited = time.perf_counter() - start
            yield replace(batch, teacher_probs=probs, teacher_logits=logits, wait_s=waited, teacher_latency_s=latency)
