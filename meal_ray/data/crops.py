"""Crops that can be rendered again.

A training crop is fully described by its source sample, its box and flip (:class:`CropParams`)
and, under CutMix, the partner sample, the partner's crop and the pasted box
(:class:`MixParams`). :func:`render_sample` turns such a record back into the exact uint8
pixels, so a teacher replica, the relabel job and a replaying loader all see what the student
saw. A :class:`CropSampler` decides the crops: :class:`RandomCropSampler` draws them
(RandomResizedCrop + RandomHorizontalFlip, today's augmentation) and
:class:`ReplayedCropSampler` replays a recorded list.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Optional, Protocol, Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from meal_ray.config import INTERPOLATIONS

_INTERP = {  # the names in meal_ray.config.INTERPOLATIONS
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def interpolation_mode(name: str) -> InterpolationMode:
    return _INTERP[name]


__all__ = ["CROP_UNIFORMS", "INTERPOLATIONS", "CropParams", "CropSampler", "EvalTransform", "MixParams",
           "RandomCropSampler", "ReplayedCropSampler", "cutmix_box", "cutmix_boxes", "interpolation_mode",
           "random_resized_crops", "render_crop", "render_crops", "render_sample", "render_samples", "scale_boxes",
           "stream_uniforms"]


@dataclass(frozen=True)
class CropParams:
    """Where a training crop came from: box (top, left, height, width) in the source image, and flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def as_list(self) -> list:
        """[top, left, height, width, flip] as ints: a row of a batch's crop tensor, built in one call."""
        return [self.top, self.left, self.height, self.width, int(self.flip)]

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(self.as_list(), dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "CropParams":
        top, left, h, w, flip = (int(v) for v in t.tolist())
        return cls(top, left, h, w, bool(flip))


@dataclass(frozen=True)
class MixParams:
    """CutMix record of one sample: the partner's sample id and crop, and the box (top, left, height, width), in
    rendered-crop pixels, where the partner's rendered crop replaces this sample's."""

    partner_id: int
    partner_crop: CropParams
    box: tuple


def _hw(size) -> list:
    return [int(size), int(size)] if isinstance(size, int) else [int(v) for v in size]


def render_crop(image: torch.Tensor, params: CropParams, size, interpolation: str = "bilinear") -> torch.Tensor:
    """Render the recorded crop of a uint8 CHW image at ``size`` x ``size`` (or ``(height, width)``;
    deterministic)."""
    out = TF.resized_crop(
        image, params.top, params.left, params.height, params.width, _hw(size),
        interpolation=_INTERP[interpolation], antialias=True,
    )
    return TF.horizontal_flip(out) if params.flip else out


def render_sample(image: torch.Tensor, crop: CropParams, size, interpolation: str = "bilinear",
                  mix: Optional[MixParams] = None, partner_image: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The uint8 pixels a recorded sample had: its crop, with the CutMix partner's crop pasted into ``mix.box``."""
    out = render_crop(image, crop, size, interpolation)
    if mix is None:
        return out
    if partner_image is None:
        raise ValueError("a mixed sample needs its partner's image to be rendered")
    top, left, height, width = (int(v) for v in mix.box)
    partner = render_crop(partner_image, mix.partner_crop, size, interpolation)
    out = out.clone()
    out[:, top:top + height, left:left + width] = partner[:, top:top + height, left:left + width]
    return out


def render_crops(images: Sequence[torch.Tensor], crops, size, interpolation: str = "bilinear") -> torch.Tensor:
    """:func:`render_crop` of N crops at once (``crops`` [N, 5]: top, left, height, width, flip; ``images[i]`` the
    source of crop i): the same pixels, with one resize per box size instead of one per crop, since torchvision's
    per-call work costs more than a small crop's resize. A box reaching outside its image (padded) goes alone."""
    crops = np.asarray(crops, np.int64).reshape(-1, 5)
    hw = _hw(size)
    if not len(crops):
        return torch.empty((0, 0, *hw), dtype=torch.uint8)
    out = torch.empty((len(crops), images[0].shape[0], *hw), dtype=images[0].dtype)
    by_box = defaultdict(list)
    for i, (top, left, height, width, flip) in enumerate(crops.tolist()):
        image_height, image_width = images[i].shape[-2:]
        if top >= 0 and left >= 0 and top + height <= image_height and left + width <= image_width:
            by_box[height, width].append(i)
        else:
            out[i] = render_crop(images[i], CropParams(top, left, height, width, bool(flip)), size, interpolation)
    for (height, width), group in by_box.items():
        cut = torch.stack([images[i][:, top:top + height, left:left + width]
                           for i, (top, left) in zip(group, crops[group, :2].tolist())])
        out[group] = TF.resize_image(cut, hw, interpolation=_INTERP[interpolation], antialias=True)
    flipped = [i for group in by_box.values() for i in group if crops[i, 4]]
    if flipped:
        out[flipped] = TF.horizontal_flip_image(out[flipped])
    return out


def render_samples(images: Sequence[torch.Tensor], crops, size, interpolation: str = "bilinear", mix_ids=None,
                   mix_crops=None, mix_boxes=None, partner_of=None) -> torch.Tensor:
    """:func:`render_sample` of N samples at once: crops as :func:`render_crops`, and where ``mix_ids[i] >= 0`` the
    partner's crop ``mix_crops[i]`` (of the image ``partner_of(mix_ids[i])``) pasted into ``mix_boxes[i]``."""
    crops = np.asarray(crops, np.int64).reshape(-1, 5)
    mixed = [] if mix_ids is None else np.flatnonzero(np.asarray(mix_ids, np.int64) >= 0).tolist()
    sources = list(images)
    if mixed:
        sources += [partner_of(int(mix_ids[i])) for i in mixed]
        crops = np.concatenate([crops, np.asarray(mix_crops, np.int64).reshape(-1, 5)[mixed]])
    out = render_crops(sources, crops, size, interpolation)
    pixels = out[:len(images)]
    if mixed:  # every paste at once: a mask of each box
        boxes = torch.as_tensor(np.asarray(mix_boxes, np.int64).reshape(-1, 4)[mixed])
        rows, cols = torch.arange(pixels.shape[-2]), torch.arange(pixels.shape[-1])
        inside = (((rows >= boxes[:, :1]) & (rows < boxes[:, :1] + boxes[:, 2:3]))[:, :, None]
                  & ((cols >= boxes[:, 1:2]) & (cols < boxes[:, 1:2] + boxes[:, 3:4]))[:, None, :])
        pixels[mixed] = torch.where(inside[:, None], out[len(images):], pixels[mixed])
    return pixels


def scale_boxes(boxes: torch.Tensor, drawn_size: int, size) -> torch.Tensor:
    """CutMix boxes [N, 4] (top, left, height, width) drawn on ``drawn_size`` px crops, moved to crops rendered at
    ``size`` (a teacher's own resolution): edges scaled and rounded; unchanged when the sizes are equal."""
    h, w = _hw(size)
    if (h, w) == (drawn_size, drawn_size):
        return boxes
    top, left = boxes[:, 0].double() * h / drawn_size, boxes[:, 1].double() * w / drawn_size
    bottom = (boxes[:, 0] + boxes[:, 2]).double() * h / drawn_size
    right = (boxes[:, 1] + boxes[:, 3]).double() * w / drawn_size
    top, left, bottom, right = (v.round().long() for v in (top, left, bottom, right))
    return torch.stack([top, left, bottom - top, right - left], dim=1)


def cutmix_box(height: int, width: int, lam: float, cy: int, cx: int) -> tuple:
    """CutMix's box (top, left, height, width) for mixing ratio ``lam`` centred at (cy, cx), clipped to the image."""
    cut_h, cut_w = int(height * (1 - lam) ** 0.5), int(width * (1 - lam) ** 0.5)
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, x0, y1 - y0, x1 - x0


def cutmix_boxes(size: int, lam: np.ndarray, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    """:func:`cutmix_box` for N square ``size`` crops at once: [N, 4] int64 (top, left, height, width)."""
    cut = np.floor(size * np.sqrt(1.0 - lam)).astype(np.int64)
    y0, y1 = np.maximum(cy - cut // 2, 0), np.minimum(cy + cut // 2, size)
    x0, x1 = np.maximum(cx - cut // 2, 0), np.minimum(cx + cut // 2, size)
    return np.stack([y0, x0, y1 - y0, x1 - x0], axis=1)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stream_uniforms(keys: Sequence[int], ids: np.ndarray, columns: int) -> np.ndarray:
    """[len(ids), columns] uniforms in [0, 1): a counter-based stream (SplitMix64 of the keys, the sample id and the
    column), so the numbers of a sample are the same whichever process draws them, with whichever others, in
    whatever order; and all of them come in a few array operations, not per sample."""
    with np.errstate(over="ignore"):
        key = np.zeros(1, np.uint64)
        for k in keys:
            key = _splitmix64(key ^ np.uint64(int(k)))
        per_sample = _splitmix64(key ^ np.asarray(ids, dtype=np.int64).astype(np.uint64))
        cells = _splitmix64(per_sample[:, None] ^ (np.arange(1, columns + 1, dtype=np.uint64) * _GOLDEN)[None, :])
    return (cells >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many boxes before its centre-crop fallback
CROP_UNIFORMS = 2 * _ATTEMPTS + 3  # area and aspect ratio per try, then top, left, flip


def random_resized_crops(u: np.ndarray, heights: np.ndarray, widths: np.ndarray, scale: Sequence[float],
                         ratio: Sequence[float]) -> np.ndarray:
    """RandomResizedCrop(scale, ratio) + RandomHorizontalFlip(0.5) for N images at once, by torchvision's rule (up to
    10 tries of an area and a log-uniform aspect ratio, rounded half to even, the first that fits; else the whole
    image clamped to the ratio range, centred), from uniforms ``u`` [N, CROP_UNIFORMS]. [N, 5] int64 (top, left,
    height, width, flip), :class:`CropParams`' layout."""
    heights, widths = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    area = (heights * widths).astype(np.float64)[:, None]
    log_ratio = np.log(np.asarray(ratio, np.float64))
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, :_ATTEMPTS])
    aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[:, _ATTEMPTS:2 * _ATTEMPTS])
    w, h = np.rint(np.sqrt(target * aspect)).astype(np.int64), np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    rows, first = np.arange(len(u)), fits.argmax(axis=1)
    w, h, found = w[rows, first], h[rows, first], fits.any(axis=1)
    in_ratio = widths / heights  # the fallback
    lo, hi = min(ratio), max(ratio)
    fallback_w = np.where(in_ratio > hi, np.rint(heights * hi).astype(np.int64), widths)
    fallback_h = np.where(in_ratio < lo, np.rint(widths / lo).astype(np.int64), heights)
    w, h = np.where(found, w, fallback_w), np.where(found, h, fallback_h)
    top = np.where(found, np.floor(u[:, 2 * _ATTEMPTS] * (heights - h + 1)).astype(np.int64), (heights - h) // 2)
    left = np.where(found, np.floor(u[:, 2 * _ATTEMPTS + 1] * (widths - w + 1)).astype(np.int64), (widths - w) // 2)
    flip = (u[:, 2 * _ATTEMPTS + 2] < 0.5).astype(np.int64)
    return np.stack([top, left, h, w, flip], axis=1)


class CropSampler(Protocol):
    """Decides the crop of sample ``sample_id`` in epoch ``epoch`` (``image`` is the uint8 CHW source) and, when it
    ``replays_mix`` (a soft-label cache), the recorded CutMix of that sample too; a live sampler mixes nothing
    (the engine mixes its batches)."""

    replays_mix: bool

    def sample(self, image: torch.Tensor, sample_id: int, epoch: int) -> CropParams: ...

    def mix(self, sample_id: int, epoch: int) -> Optional[MixParams]: ...


class RandomCropSampler:
    """RandomResizedCrop(scale, ratio) + RandomHorizontalFlip(0.5), drawn from torch's global RNG exactly as
    torchvision draws them (the paper's train augmentation; the loader seeds the stream)."""

    replays_mix = False

    def __init__(self, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)):
        self.scale, self.ratio = tuple(scale), tuple(ratio)

    def sample(self, image: torch.Tensor, sample_id: int = 0, epoch: int = 0) -> CropParams:
        top, left, h, w = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        return CropParams(top, left, h, w, bool(torch.rand(()) < 0.5))

    def mix(self, sample_id: int, epoch: int = 0) -> None:
        return None


class ReplayedCropSampler:
    """Crops from a record: ``record[(pass, sample_id)]``; epoch ``e`` replays pass ``e % passes`` (crops only: the
    engine mixes live)."""

    replays_mix = False

    def __init__(self, record: Mapping[tuple, CropParams], passes: Optional[int] = None):
        self.record = dict(record)
        self.passes = passes or (1 + max((p for p, _ in self.record), default=0))

    def sample(self, image: torch.Tensor, sample_id: int, epoch: int = 0) -> CropParams:
        key = (epoch % self.passes, int(sample_id))
        try:
            return self.record[key]
        except KeyError:
            raise KeyError(f"no recorded crop for sample {sample_id} in pass {key[0]} (epoch {epoch}); "
                           f"the record holds {len(self.record)} crops over {self.passes} passes") from None

    def mix(self, sample_id: int, epoch: int = 0) -> None:
        return None


class EvalTransform:
    """Resize(size / crop_pct) + CenterCrop(size): 256/224 for ImageNet."""

    def __init__(self, size: int, crop_pct: float = 224 / 256, interpolation: str = "bilinear"):
        self.size, self.resize, self.interpolation = size, int(round(size / crop_pct)), interpolation

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        out = TF.resize(image, [self.resize], interpolation=_INTERP[self.interpolation], antialias=True)
        return TF.center_crop(out, [self.size, self.size])
