"""The wire format between soft-label clients and the teacher application: typed, validated once, versioned.

A :class:`TeacherRequest` carries one mini-batch of uint8 crops ``[B, C, H, W]`` (each teacher
replica applies its own preprocessing). A :class:`CropRequest` (``teachers.request: crops``)
carries only where the crops come from, <= 64 bytes per sample: sample id, crop box, flip and
CutMix record; each replica reads the samples from the training set itself and renders them at
its own resolution and interpolation. A :class:`TeacherReply` carries the ensemble's fp16
averaged probabilities and logits ``[B, C]`` and the teachers' inference time, or, when the
request asks for ``top_k``, only the k largest probabilities per sample with their class ids and
logits and the other classes' mean logit (the soft-label cache's record). Both carry
``PROTOCOL_VERSION``; a client and a server of different versions refuse each other with a
:class:`~meal_ray.errors.ProtocolError` that says which side to upgrade. Plain numpy, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from meal_ray.config import DEFAULT_APP_NAME
from meal_ray.ensemble import expand_top_k, top_k_soft_labels
from meal_ray.errors import HOW_TO_START, ProtocolError

__all__ = ["CROP_FIELDS", "DEFAULT_APP_NAME", "HOW_TO_START", "MAX_SAMPLES", "MAX_SIDE", "MIX_FIELDS",
           "PROTOCOL_VERSION", "CropRequest", "TeacherReply", "TeacherRequest", "check_version", "parse_request",
           "validate_crops"]

PROTOCOL_VERSION = 1
#: Largest request a replica accepts, checked on the shape before any tensor is made from it: an oversized or
#: hostile request is refused with a ProtocolError, not answered with an out-of-memory crash of the replica.
MAX_SIDE = 4096  # px, a crop's height or width (also a crop request's render size and box sides)
MAX_SAMPLES = 65536  # crops in one request (replicas infer it in chunks of max_batch_size)
_UPGRADE = "Run the same meal-ray version on the train workers and in the teacher application (redeploy it)."


def check_version(version: Any, what: str) -> None:
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"{what} speaks meal-ray teacher protocol v{version}, this side speaks "
                            f"v{PROTOCOL_VERSION}. {_UPGRADE}")


def _expected(in_chans: Optional[int]) -> str:
    return f"uint8 numpy array of shape [B, {in_chans if in_chans is not None else 'C'}, H, W] (raw 0..255 pixels)"


def validate_crops(images: Any, in_chans: Optional[int] = None) -> np.ndarray:
    """Check a crop batch: a numpy uint8 array [B, C, H, W] with ``in_chans`` channels. Raise ProtocolError
    otherwise."""
    expected = _expected(in_chans)
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise ProtocolError(f"teacher request images must be a {expected}; got {type(images).__name__}. "
                            "Send batch.images.numpy().")
    if images.dtype != np.uint8:
        raise ProtocolError(f"teacher request images must be a {expected}; got dtype {images.dtype}. "
                            "Send the uint8 crops before normalization; each teacher normalizes them itself.")
    if images.ndim != 4:
        raise ProtocolError(f"teacher request images must be a {expected}; got {images.ndim} dims, "
                            f"shape {tuple(images.shape)}.")
    if in_chans is not None and images.shape[1] != in_chans:
        raise ProtocolError(f"teacher request images must be a {expected}; got {images.shape[1]} channels, "
                            f"shape {tuple(images.shape)}. The teachers take {in_chans}-channel images.")
    if min(images.shape) == 0:
        raise ProtocolError(f"teacher request images must be a non-empty {expected}; got shape {tuple(images.shape)}.")
    _check_size(len(images), max(images.shape[2:]), tuple(images.shape))
    return images


def _check_top_k(top_k: Any, num_classes: Optional[int]) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ProtocolError(f"teacher request top_k={top_k!r} must be a whole number >= 1, or None for every class.")
    if top_k is not None and num_classes is not None and top_k > num_classes:
        raise ProtocolError(f"teacher request top_k={top_k} is more than the teachers' {num_classes} classes; ask "
                            "for fewer (teachers.reply_top_k).")


def _check_size(samples: int, side: int, shape: tuple) -> None:
    if samples > MAX_SAMPLES or side > MAX_SIDE:
        raise ProtocolError(f"teacher request too large: shape {shape}; a request holds at most {MAX_SAMPLES} crops "
                            f"of at most {MAX_SIDE} px a side. Send smaller batches (optim.batch_size) or crops "
                            "(data.image_size).")


@dataclass(frozen=True)
class TeacherRequest:
    """One mini-batch of crops for the teacher ensemble."""

    images: np.ndarray  # uint8 [B, C, H, W]
    version: int = PROTOCOL_VERSION
    top_k: Optional[int] = None  # reply with only the k largest probabilities per sample (None: all classes)

    @classmethod
    def from_images(cls, images, top_k: Optional[int] = None) -> "TeacherRequest":
        """From a uint8 tensor or array (zero-copy for a contiguous CPU tensor)."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().contiguous().numpy()
        return cls(images, top_k=top_k)

    def __len__(self) -> int:
        return len(self.images)

    @staticmethod
    def parse(obj: Any, in_chans: Optional[int] = None) -> "TeacherRequest":
        """Validate what a replica received; the one place requests are checked."""
        if isinstance(obj, (np.ndarray, torch.Tensor)):
            raise ProtocolError("teacher request is a bare array (an older meal-ray client without a protocol "
                                f"version?); send meal_ray.serve.protocol.TeacherRequest(images). {_UPGRADE}")
        if not isinstance(obj, TeacherRequest):
            raise ProtocolError(f"teacher request must be a meal_ray.serve.protocol.TeacherRequest (or CropRequest), "
                                f"got {type(obj).__name__}.")
        check_version(getattr(obj, "version", None), "the client")
        validate_crops(obj.images, in_chans)
        return obj


CROP_FIELDS = 6  # sample id, top, left, height, width, flags (bit 0: flip)
MIX_FIELDS = 15  # + partner id (-1: not mixed), partner top, left, height, width, box top, left, height, width;
#                  flags bit 1: the partner's flip. 60 bytes per sample.


@dataclass(frozen=True)
class CropRequest:
    """One mini-batch as crop records: int32 ``[B, 6]`` (no CutMix) or ``[B, 15]`` (CutMix), and ``size``, the side
    of the crops the student renders (CutMix boxes are in its pixels; a replica rendering at another resolution
    scales them)."""

    records: np.ndarray  # int32 [B, CROP_FIELDS | MIX_FIELDS]
    size: int
    version: int = PROTOCOL_VERSION
    top_k: Optional[int] = None  # as TeacherRequest.top_k

    def __len__(self) -> int:
        return len(self.records)

    @classmethod
    def from_batch(cls, batch, top_k: Optional[int] = None) -> "CropRequest":
        """From a :class:`~meal_ray.data.Batch` that records its sample ids and crops (and CutMix partners)."""
        if batch.indices is None or batch.crops is None:
            raise ProtocolError("teachers.request=crops needs batches that record sample ids and crops (the "
                                "training loader's); send pixels (teachers.request=pixels) otherwise.")
        flags = batch.crops[:, 4:5]
        cols = [batch.indices.view(-1, 1), batch.crops[:, :4]]
        if batch.mix_ids is not None:
            flags = flags | (batch.mix_crops[:, 4:5] << 1)
            cols += [flags, batch.mix_ids.view(-1, 1), batch.mix_crops[:, :4], batch.mix_boxes]
        else:
            cols.append(flags)
        return cls(torch.cat(cols, dim=1).numpy().astype(np.int32), int(batch.images.shape[-1]), top_k=top_k)

    def fields(self) -> dict:
        """int64 tensors: ``ids`` [B], ``crops`` [B, 5] and, under CutMix, ``mix_ids``, ``mix_crops``, ``mix_boxes``."""
        r = torch.from_numpy(self.records.astype(np.int64))
        flags = r[:, 5:6]
        out = {"ids": r[:, 0], "crops": torch.cat([r[:, 1:5], flags & 1], dim=1)}
        if r.shape[1] == MIX_FIELDS:
            out.update(mix_ids=r[:, 6], mix_crops=torch.cat([r[:, 7:11], (flags >> 1) & 1], dim=1),
                       mix_boxes=r[:, 11:15])
        return out

    @staticmethod
    def parse(obj: Any, num_samples: Optional[int] = None) -> "CropRequest":
        """Validate a crop request (and, where the dataset is known, that its sample ids are in it)."""
        check_version(getattr(obj, "version", None), "the client")
        r, size = obj.records, obj.size
        if not isinstance(r, np.ndarray) or r.dtype != np.int32 or r.ndim != 2 \
                or r.shape[1] not in (CROP_FIELDS, MIX_FIELDS) or len(r) == 0:
            got = f"{r.dtype} {tuple(r.shape)}" if isinstance(r, np.ndarray) else type(r).__name__
            raise ProtocolError(f"crop request records must be a non-empty int32 array [B, {CROP_FIELDS}] or "
                                f"[B, {MIX_FIELDS}] (sample id, crop box, flags[, CutMix record]); got {got}. "
                                "Build it with CropRequest.from_batch(batch).")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ProtocolError(f"crop request size={size!r} must be the student's crop side in pixels (>= 1).")
        mixed = r[r[:, 6] >= 0] if r.shape[1] == MIX_FIELDS else np.zeros((0, MIX_FIELDS), np.int32)
        sides = np.concatenate([r[:, 3:5], mixed[:, 9:11]])  # crop and CutMix-partner crop heights and widths
        _check_size(len(r), max(int(size), int(sides.max())), (len(r), int(size)))
        ids = np.concatenate([r[:, 0], mixed[:, 6]])
        if ids.min() < 0 or (num_samples is not None and ids.max() >= num_samples):
            raise ProtocolError(f"crop request sample ids must be in [0, {num_samples or 'N'}) (the training set "
                                f"the replicas read); got {int(ids.min())}..{int(ids.max())}. Serve the job's "
                                "dataset (args.data) or send pixels.")
        if sides.min() < 1 or not np.isin(r[:, 5], (0, 1, 2, 3) if r.shape[1] == MIX_FIELDS else (0, 1)).all():
            raise ProtocolError("crop request crops must have height, width >= 1 and flip flags 0 or 1 (+2: the "
                                "partner's flip).")
        return obj


def parse_request(obj: Any, in_chans: Optional[int] = None, num_samples: Optional[int] = None,
                  num_classes: Optional[int] = None):
    """A :class:`TeacherRequest` or a :class:`CropRequest`, validated (``top_k`` against the teachers'
    ``num_classes`` where known); ProtocolError for anything else."""
    if isinstance(obj, CropRequest):
        request = CropRequest.parse(obj, num_samples)
    else:
        request = TeacherRequest.parse(obj, in_chans)
    _check_top_k(request.top_k, num_classes)
    return request


@dataclass(frozen=True)
class TeacherReply:
    """The ensemble's answer to one request: p_e and z_e in fp16, and the teachers' inference time; for a top-k
    request, p_e's k largest per sample (``ids``), their logits and ``rest``, the other classes' mean logit."""

    probs: np.ndarray  # float16 [B, C] (top-k: [B, k]): mean of the teachers' softmax
    logits: np.ndarray  # float16 [B, C] (top-k: [B, k]): mean of the teachers' logits
    latency_s: float  # teacher inference wall time measured in the ingress
    version: int = PROTOCOL_VERSION
    ids: Optional[np.ndarray] = None  # top-k: int32 [B, k] class ids, largest probability first
    rest: Optional[np.ndarray] = None  # top-k: float16 [B], mean logit of the other classes
    classes: Optional[int] = None  # top-k: C

    @property
    def num_classes(self) -> int:
        return int(self.classes if self.ids is not None else self.probs.shape[1])

    @classmethod
    def from_tensors(cls, probs: torch.Tensor, logits: torch.Tensor, latency_s: float,
                     top_k: Optional[int] = None) -> "TeacherReply":
        """The reply to send; with ``top_k`` below the class count, only the top-k record."""
        if top_k is None or top_k >= probs.shape[1]:
            return cls(probs.numpy().astype(np.float16), logits.numpy().astype(np.float16), float(latency_s))
        ids, top_p, top_z, rest = top_k_soft_labels(probs, logits, top_k)
        return cls(top_p.numpy().astype(np.float16), top_z.numpy().astype(np.float16), float(latency_s),
                   ids=ids.numpy().astype(np.int32), rest=rest.numpy().astype(np.float16), classes=probs.shape[1])

    @staticmethod
    def parse(obj: Any, rows: int) -> "TeacherReply":
        """Validate what the client received for a request of ``rows`` crops."""
        if not isinstance(obj, TeacherReply):
            raise ProtocolError(f"the teacher application replied with a {type(obj).__name__}, not a TeacherReply "
                                f"(an older meal-ray server?). {_UPGRADE}")
        check_version(getattr(obj, "version", None), "the teacher application")
        if obj.probs.shape != obj.logits.shape or obj.probs.ndim != 2 or obj.probs.shape[0] != rows or (
                obj.ids is not None and (obj.ids.shape != obj.probs.shape or obj.rest is None
                                         or obj.rest.shape != (rows,))):
            raise ProtocolError(f"the teacher application returned probs {obj.probs.shape} and logits "
                                f"{obj.logits.shape} for a request of {rows} crops.")
        return obj

    def tensors(self, recovery: str = "marginal") -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (probs, logits) [B, C] for the training step; a top-k reply expanded as the soft-label cache's
        top-k rows are (``recovery``: marginal or renormalize)."""
        probs = torch.from_numpy(self.probs.astype(np.float32))
        logits = torch.from_numpy(self.logits.astype(np.float32))
        if self.ids is None:
            return probs, logits
        return expand_top_k(torch.from_numpy(self.ids.astype(np.int64)), probs, logits,
                            torch.from_numpy(self.rest.astype(np.float32)), self.num_classes, recovery)
