"""The Batch every soft-label source and the training loop pass along, and CutMix that records its mix.

A batch fully describes its pixels: sample ids, crop box + flip, and (under CutMix) each
sample's partner id, partner crop and pasted box. :func:`render_batch` renders them again,
bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Optional

import numpy as np
import torch

from meal_ray.data.crops import cutmix_box, render_samples
from meal_ray.data.datasets import sample_by_id


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, C, H, W], what student *and* teachers see
    labels: torch.Tensor  # int64 [B]
    indices: Optional[torch.Tensor] = None  # int64 [B]: sample ids in the full training set
    crops: Optional[torch.Tensor] = None  # int64 [B, 5]: top, left, height, width, flip
    labels_b: Optional[torch.Tensor] = None  # CutMix partner labels
    lam: float | torch.Tensor = 1.0  # CutMix: fraction of the image from the original sample (per sample: [B])
    mix_ids: Optional[torch.Tensor] = None  # int64 [B]: CutMix partner sample ids
    mix_crops: Optional[torch.Tensor] = None  # int64 [B, 5]: the partners' crops
    mix_boxes: Optional[torch.Tensor] = None  # int64 [B, 4]: pasted box (top, left, height, width) in crop pixels
    epoch: int = 0  # the epoch this batch belongs to (a replayed source reads pass epoch % passes)
    teacher_probs: Optional[torch.Tensor] = None  # p_e [B, C]
    teacher_logits: Optional[torch.Tensor] = None  # z_e [B, C]
    wait_s: float = 0.0  # time the training loop blocked waiting for these soft labels
    teacher_latency_s: Optional[float] = None  # teacher inference time reported by the source
    teacher_retries: int = 0  # requests for these soft labels asked again because their replica was lost

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def render(self, dataset, size: int, interpolation: str = "bilinear") -> torch.Tensor:
        """This batch's uint8 images, rendered again from ``dataset`` and the records alone."""
        return render_batch(dataset, self.indices, self.crops, size, interpolation,
                            self.mix_ids, self.mix_crops, self.mix_boxes)


def batches_from_loader(loader) -> Iterator[Batch]:
    """Batches from a train loader (over a :class:`~meal_ray.data.loaders.TrainView`); one whose view replays CutMix
    records yields mixed batches with a per-sample ``lam``."""
    replays_mix = loader.dataset.replays_mix
    for items in loader:
        batch = Batch(*items[:4])
        if replays_mix:
            record = items[4]
            boxes = record[:, 7:11]
            size = batch.images.shape[-2] * batch.images.shape[-1]
            lam = 1.0 - (boxes[:, 2] * boxes[:, 3]).double() / size
            batch = replace(batch, mix_ids=record[:, 0], labels_b=record[:, 1], mix_crops=record[:, 2:7],
                            mix_boxes=boxes, lam=lam)
        yield batch


def render_batch(dataset, ids: torch.Tensor, crops: torch.Tensor, size: int, interpolation: str = "bilinear",
                 mix_ids: Optional[torch.Tensor] = None, mix_crops: Optional[torch.Tensor] = None,
                 mix_boxes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 [B, C, size, size] from sample ids + crops (+ CutMix records), looked up in ``dataset`` by sample id."""
    images = [sample_by_id(dataset, sid)[0] for sid in ids.tolist()]
    return render_samples(images, crops, size, interpolation, mix_ids, mix_crops, mix_boxes,
                          lambda sid: sample_by_id(dataset, sid)[0])


def beta_sample(beta: float, generator: Optional[torch.Generator] = None) -> float:
    """One Beta(beta, beta) draw taken from ``generator`` (torch's Beta has no generator argument, so the
    draw seeds a numpy generator from it: one step of ``generator`` per draw)."""
    seed = int(torch.randint(2**62, (), generator=generator))
    return float(np.random.default_rng(seed).beta(beta, beta))


def cutmix(batch: Batch, beta: float = 1.0, prob: float = 1.0, generator: Optional[torch.Generator] = None) -> Batch:
    """CutMix on the uint8 batch *before* the teachers see it, so teacher and student share the mixed image.

    One box and one partner permutation per batch (the CutMix paper's way); the batch records,
    per sample, the partner's id and crop and the box, so the mixed pixels can be rendered again.
    Every draw (apply or not, lambda, partners, centre) comes from ``generator``: a caller that
    restores it replays the same mixes whatever the global RNG did meanwhile.
    """
    if prob <= 0 or float(torch.rand((), generator=generator)) >= prob:
        return batch
    b, _, h, w = batch.images.shape
    lam = beta_sample(beta, generator)
    perm = torch.randperm(b, generator=generator)
    cy, cx = int(torch.randint(h, (), generator=generator)), int(torch.randint(w, (), generator=generator))
    top, left, height, width = cutmix_box(h, w, lam, cy, cx)
    images = batch.images.clone()
    images[:, :, top:top + height, left:left + width] = batch.images[perm, :, top:top + height, left:left + width]
    lam = 1.0 - height * width / (h * w)
    record = {}
    if batch.indices is not None and batch.crops is not None:
        record = dict(mix_ids=batch.indices[perm], mix_crops=batch.crops[perm],
                      mix_boxes=torch.tensor([top, left, height, width], dtype=torch.int64).repeat(b, 1))
    return replace(batch, images=images, labels_b=batch.labels[perm], lam=lam, **record)
