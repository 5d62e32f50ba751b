"""The soft-label source protocol, the hard-label pass-through and the prefetch window.

Every source turns an iterator of uint8 batches into the same batches annotated with the
teachers' averaged probabilities and logits, so one training loop serves all of them.
"""

from __future__ import annotations

import collections
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

from meal_ray.config import JobConfig
from meal_ray.data.batch import Batch
from meal_ray.data.crops import CropSampler


class SoftLabelSource(Protocol):
    """What the engine and the launchers need of a source (see :mod:`meal_ray.source_registry`)."""

    name: str

    @classmethod
    def check_config(cls, cfg: JobConfig) -> None:
        """On the driver, before Ray starts: refuse what can be refused from the config and local files alone."""

    @classmethod
    def preflight(cls, cfg: JobConfig) -> None:
        """On the driver, Ray up, before training: refuse a source that cannot serve this job (e.g. other teachers)."""

    @classmethod
    def from_config(cls, cfg: JobConfig, device) -> "SoftLabelSource":
        """Build the source inside a train worker (or in-process)."""

    def attach(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """Yield the batches in order, each with ``teacher_probs`` / ``teacher_logits`` set."""

    def crop_sampler(self) -> Optional[CropSampler]:
        """The CropSampler the train loader must use (a cache replays its own crops), or None: random crops."""

    def close(self) -> None: ...


class NoSoftLabels:
    """Hard-label training (pretraining stage): batches pass through untouched."""

    name = "none"

    @classmethod
    def check_config(cls, cfg: JobConfig) -> None:
        pass

    @classmethod
    def preflight(cls, cfg: JobConfig) -> None:
        pass

    @classmethod
    def from_config(cls, cfg: JobConfig, device=None) -> "NoSoftLabels":
        return cls()

    def attach(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        yield from batches

    def crop_sampler(self) -> None:
        return None

    def close(self) -> None:
        pass


class PrefetchWindow:
    """Keep up to ``window`` soft-label requests in flight so teacher inference overlaps the student step.

    ``submit(batch)`` starts a request and returns a handle; ``collect(handle)`` blocks for
    its result ``(probs, logits, latency_s, retries)``. Order is preserved. ``wait_s`` is the time the
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
            probs, logits, latency, retries = self.collect(handle)
            waited = time.perf_counter() - start
            yield replace(batch, teacher_probs=probs, teacher_logits=logits, wait_s=waited, teacher_latency_s=latency,
                          teacher_retries=retries)
