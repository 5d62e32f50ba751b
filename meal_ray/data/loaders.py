"""Loaders: the training view (a crop sampler decides each sample's crop), the eval view, normalization.

The caller builds the loaders and hands them to the engine, so a job can train on random
crops (today's augmentation) or on exactly the crops of a record (:class:`ReplayedCropSampler`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from meal_ray.config import DataConfig
from meal_ray.data.crops import CropSampler, EvalTransform, RandomCropSampler, render_samples
from meal_ray.data.datasets import load_datasets, sample_by_id, sample_ids


class TrainView(Dataset):
    """Yields (uint8 crop, label, sample id, crop [top, left, h, w, flip]).

    Index with ``i`` or with ``(i, epoch)`` (what :class:`EpochSampler` yields), so a replayed
    sampler knows which pass to replay. When the sampler ``replays_mix`` (a cache), a fifth item follows, the
    mix record [partner id (-1: none), partner label, partner crop (5), box (4)], and the sample is rendered mixed.
    """

    def __init__(self, base: Dataset, sampler: CropSampler, size: int, interpolation: str = "bilinear"):
        self.base, self.sampler, self.size, self.interpolation = base, sampler, size, interpolation
        self.ids = sample_ids(base)

    @property
    def replays_mix(self) -> bool:
        """Whether items carry recorded CutMix (then the engine must not mix again)."""
        return self.sampler.replays_mix

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list:
        """A batch's items at once (a DataLoader asks so): each crop decided in turn, as one by one (the same draws
        from the same streams), then all rendered together by :func:`render_samples` (the same bytes, a fraction of
        torchvision's per-call work)."""
        images, labels, sids, crops, mixes = [], [], [], [], []
        for key in keys:
            i, epoch = key if isinstance(key, tuple) else (key, 0)
            image, label = self.base[i]
            sid = int(self.ids[i])
            crops.append(self.sampler.sample(image, sid, epoch).as_list())
            mixes.append(self.sampler.mix(sid, epoch) if self.sampler.replays_mix else None)
            images.append(image)
            labels.append(label)
            sids.append(sid)
        crops = torch.tensor(crops, dtype=torch.int64).reshape(-1, 5)
        if not self.sampler.replays_mix:
            pixels = render_samples(images, crops, self.size, self.interpolation)
            return list(zip(pixels, labels, sids, crops))
        partners = {mix.partner_id: sample_by_id(self.base, mix.partner_id) for mix in mixes if mix is not None}
        records = torch.tensor([[-1, label] + [0] * 9 if mix is None else
                                [mix.partner_id, partners[mix.partner_id][1], *mix.partner_crop.as_list(),
                                 *mix.box] for mix, label in zip(mixes, labels)], dtype=torch.int64).reshape(-1, 11)
        pixels = render_samples(images, crops, self.size, self.interpolation, records[:, 0], records[:, 2:7],
                                records[:, 7:11], lambda sid: partners[sid][0])
        return list(zip(pixels, labels, sids, crops, records))


class EpochSampler(DistributedSampler):
    """DistributedSampler (per-rank shard, shuffled per epoch) that yields ``(index, epoch)``."""

    def __iter__(self):
        epoch = self.epoch
        return ((i, epoch) for i in super().__iter__())


class EvalView(Dataset):
    def __init__(self, base: Dataset, transform: EvalTransform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return self.transform(image), label


class Normalize(torch.nn.Module):
    """uint8 NCHW -> float (x/255 - mean)/std on the model's device, optionally in channels-last layout."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = False):
        super().__init__()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)


def build_train_loader(train: Dataset, cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1,
                       seed: int = 0, crop_sampler: Optional[CropSampler] = None) -> DataLoader:
    """This rank's shard, reshuffled per epoch via ``loader.sampler.set_epoch``; crops from ``crop_sampler``
    (default: random, as the paper)."""
    sampler_ = crop_sampler or RandomCropSampler(cfg.crop_scale, cfg.crop_ratio)
    view = TrainView(train, sampler_, cfg.image_size, cfg.interpolation)
    sampler = EpochSampler(view, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    # Worker processes start anew each epoch, seeded from ``gen`` (a checkpoint keeps its state): persistent workers
    # would carry their random streams across epochs, out of a checkpoint's reach, and a resumed run would crop
    # differently from then on.
    return DataLoader(view, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=cfg.loader_workers,
                      generator=gen, persistent_workers=False, pin_memory=_pin(cfg))


def build_val_loader(val: Dataset, cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """This rank's strided shard of the validation set (Resize + CenterCrop)."""
    view = EvalView(val, EvalTransform(cfg.image_size, cfg.crop_pct, cfg.interpolation))
    shard = Subset(view, list(range(rank, len(view), world_size)))
    return DataLoader(shard, batch_size=max(batch_size, 256), shuffle=False, num_workers=cfg.loader_workers,
                      pin_memory=_pin(cfg))


def _pin(cfg: DataConfig) -> bool:
    """data.pin_memory where it means something (a CUDA device); a no-op on CPU-only machines."""
    return bool(cfg.pin_memory) and torch.cuda.is_available()


def build_loaders(cfg: DataConfig, num_classes: int, batch_size: int, rank: int = 0, world_size: int = 1,
                  seed: int = 0, crop_sampler: Optional[CropSampler] = None):
    """(train loader, this rank's val loader, class names) for a job's data config."""
    train, val, classes = load_datasets(cfg, num_classes)
    return (build_train_loader(train, cfg, batch_size, rank, world_size, seed, crop_sampler),
            build_val_loader(val, cfg, batch_size, rank, world_size), classes)
