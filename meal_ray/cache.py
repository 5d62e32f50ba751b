"""The offline soft-label cache (FKD mode): Parquet shards of per-crop soft labels, and a manifest with checksums.

Relabel once, distill many: ``meal-ray relabel`` draws, for each pass, every training
sample's crop (and CutMix partner and box, when the job mixes), asks the teachers once, and
stores here what a distillation needs to replay that crop without any teacher running::

    DIR/manifest.json                 what the cache fits (teacher set, dataset, classes, image size, crops,
                                      CutMix, k, passes, seed) and every complete shard with its sha256
    DIR/pass-000/shard-00000.parquet  one row per crop: sample_id, crop[5], mix_id, mix_crop[5], mix_box[4],
                                      topk_ids[k], topk_probs[k] (fp16), topk_logits[k] (fp16), rest_logit (fp16)

A shard is written to a temporary name and renamed, and is listed in the manifest only once
complete, so a killed relabel loses only the shards in flight; a shard whose checksum does
not match the manifest is never read. With ``k == num_classes`` the soft labels are exact
(fp16). With ``k < C`` the probabilities are rebuilt with FKD's marginal smoothing (the
left-over mass spread evenly over the other classes; ``renormalize`` is the option), and the
logits the discriminator sees are the stored top-k logits with every other class at the
mean of the others (``rest_logit``). Plain pyarrow and torch: no Ray here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from meal_ray.data.crops import (
    CROP_UNIFORMS,
    CropParams,
    MixParams,
    cutmix_boxes,
    random_resized_crops,
    render_sample,
    render_samples,
    stream_uniforms,
)
from meal_ray.ensemble import expand_top_k, top_k_soft_labels
from meal_ray.errors import CacheError, CacheMismatchError
from meal_ray.files import sha256_of, write_text_atomic

FORMAT = "meal-ray-soft-label-cache"
SCHEMA_VERSION = 2  # 2: crops drawn from a counter-based stream, all of a chunk at once (v1: one torch stream each)
CROP_STREAM = 0x4D45414C  # the crop stream's first key, apart from any other use of (seed, pass, sample id)
MANIFEST = "manifest.json"


def schema(k: int) -> pa.Schema:
    return pa.schema([
        ("sample_id", pa.int64()),
        ("crop", pa.list_(pa.int32(), 5)),  # top, left, height, width, flip
        ("mix_id", pa.int64()),  # CutMix partner sample id, -1 when not mixed
        ("mix_crop", pa.list_(pa.int32(), 5)),
        ("mix_box", pa.list_(pa.int32(), 4)),  # top, left, height, width in crop pixels
        ("topk_ids", pa.list_(pa.int32(), k)),
        ("topk_probs", pa.list_(pa.float16(), k)),
        ("topk_logits", pa.list_(pa.float16(), k)),
        ("rest_logit", pa.float16()),  # mean logit of the classes outside the top k (0 when k == C)
    ])


@dataclass
class CacheSpec:
    """What a cache was made for; a job can read it only where these agree (``passes`` and ``seed`` aside)."""

    teacher_set: dict  # {"fingerprint", "autocast", "teachers": [descriptions]}
    dataset: dict  # {"fingerprint", "name", "num_samples"}
    num_classes: int
    image_size: int
    crop: dict  # {"scale", "ratio", "interpolation"}
    cutmix: dict  # {"enabled", "beta", "prob"}
    k: int
    passes: int
    seed: int
    format: str = FORMAT
    schema_version: int = SCHEMA_VERSION
    shards_per_pass: dict = field(default_factory=dict)  # pass -> number of shards

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "CacheSpec":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})

    def mismatches(self, job: "CacheSpec") -> list:
        """How this cache differs from what ``job`` needs, one readable line each (empty: it fits)."""
        out = []
        if self.teacher_set["fingerprint"] != job.teacher_set["fingerprint"]:
            ours = ", ".join(t["model"] for t in self.teacher_set["teachers"])
            theirs = ", ".join(t["model"] for t in job.teacher_set["teachers"])
            out.append(f"teacher set: cache {self.teacher_set['fingerprint']} ({ours}, autocast "
                       f"{self.teacher_set['autocast']}), job {job.teacher_set['fingerprint']} ({theirs}, autocast "
                       f"{job.teacher_set['autocast']})")
        if self.dataset["fingerprint"] != job.dataset["fingerprint"]:
            out.append(f"dataset: cache {self.dataset['name']} {self.dataset['fingerprint']}, job "
                       f"{job.dataset['name']} {job.dataset['fingerprint']}")
        for key in ("num_classes", "image_size", "crop", "cutmix"):
            if getattr(self, key) != getattr(job, key):
                out.append(f"{key}: cache {getattr(self, key)}, job {getattr(job, key)}")
        return out


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def shard_name(pass_index: int, shard: int) -> str:
    return f"pass-{pass_index:03d}/shard-{shard:05d}.parquet"


def write_shard_file(root: str | Path, name: str, table: pa.Table) -> Path:
    """Write a shard under a temporary name, fsync, rename: a shard file is complete or absent."""
    path = Path(root) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


_MIX_COLUMNS = 5  # mixed or not, lambda, partner, box centre row and column


@dataclass
class CropRecords:
    """The crop (and CutMix partner, partner crop and box) of N samples in one pass, as a shard stores them, with the
    partners' images for rendering."""

    crops: np.ndarray  # int64 [N, 5]
    mix_ids: np.ndarray  # int64 [N], -1: not mixed
    mix_crops: np.ndarray  # int64 [N, 5]
    mix_boxes: np.ndarray  # int64 [N, 4]
    partner_images: dict  # partner sample id -> its image

    def render(self, i: int, image: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
        """Sample ``i``'s uint8 pixels (``image`` is its source)."""
        crop, mix, partner = self.params(i)
        return render_sample(image, crop, size, interpolation, mix, partner)

    def render_all(self, images: list, size: int, interpolation: str) -> torch.Tensor:
        """All N samples' uint8 pixels at once (``images`` their sources): the same as :meth:`render` of each."""
        return render_samples(images, self.crops, size, interpolation, self.mix_ids, self.mix_crops, self.mix_boxes,
                              self.partner_images.__getitem__)

    def params(self, i: int) -> tuple:
        """``(CropParams, MixParams or None, partner image or None)`` of sample ``i``: :func:`render_sample`'s."""
        crop = CropParams(*self.crops[i, :4].tolist(), bool(self.crops[i, 4]))
        if self.mix_ids[i] < 0:
            return crop, None, None
        partner = int(self.mix_ids[i])
        mix = MixParams(partner, CropParams(*self.mix_crops[i, :4].tolist(), bool(self.mix_crops[i, 4])),
                        tuple(self.mix_boxes[i].tolist()))
        return crop, mix, self.partner_images[partner]


def draw_crop_records(sample_ids: np.ndarray, images: list, pass_index: int, *, seed: int, scale, ratio,
                      image_size: int, cutmix: dict, partner_ids: np.ndarray,
                      image_of: Callable[[int], torch.Tensor]) -> CropRecords:
    """The crop records of ``sample_ids`` (their uint8 CHW ``images``) in one pass: RandomResizedCrop + flip by
    torchvision's rule, then, with CutMix, whether the sample is mixed (``prob``), lambda ~ Beta(beta, beta), a
    partner among ``partner_ids`` with a crop of its own and the box (the training CutMix's rule). Drawn for all
    samples at once from a counter-based stream of (seed, pass, sample id): the same record whichever process draws
    it, with whichever other samples, in whatever order."""
    ids = np.asarray(sample_ids, np.int64)
    n_crop = CROP_UNIFORMS
    u = stream_uniforms((CROP_STREAM, seed, pass_index), ids, 2 * n_crop + _MIX_COLUMNS)
    sizes = np.array([img.shape[-2:] for img in images], np.int64).reshape(-1, 2)
    crops = random_resized_crops(u[:, :n_crop], sizes[:, 0], sizes[:, 1], scale, ratio)
    n = len(ids)
    mix_ids, mix_crops, mix_boxes = np.full(n, -1, np.int64), np.zeros((n, 5), np.int64), np.zeros((n, 4), np.int64)
    partner_images: dict = {}
    if cutmix.get("enabled"):
        m = u[:, n_crop:n_crop + _MIX_COLUMNS]
        mixed = np.flatnonzero(m[:, 0] < cutmix["prob"])
        beta = float(cutmix["beta"])
        lam = m[mixed, 1] if beta == 1.0 else _beta_quantile(beta, m[mixed, 1])  # Beta(1, 1) is uniform
        partners = np.asarray(partner_ids, np.int64)[np.floor(m[mixed, 2] * len(partner_ids)).astype(np.int64)]
        for pid in np.unique(partners).tolist():
            partner_images[pid] = image_of(pid)
        psizes = np.array([partner_images[pid].shape[-2:] for pid in partners.tolist()], np.int64).reshape(-1, 2)
        mix_ids[mixed] = partners
        mix_crops[mixed] = random_resized_crops(u[mixed, n_crop + _MIX_COLUMNS:], psizes[:, 0], psizes[:, 1], scale,
                                                ratio)
        centre = np.floor(m[mixed, 3:5] * image_size).astype(np.int64)
        mix_boxes[mixed] = cutmix_boxes(image_size, lam, centre[:, 0], centre[:, 1])
    return CropRecords(crops, mix_ids, mix_crops, mix_boxes, partner_images)


def _beta_quantile(beta: float, u: np.ndarray) -> np.ndarray:
    """Beta(beta, beta) draws from uniforms (inverse CDF)."""
    from scipy.special import betaincinv

    return betaincinv(beta, beta, u)


# ----------------------------------------------------------------------------- encoding


def encode(sample_ids, crops, mix_ids, mix_crops, mix_boxes, probs: torch.Tensor, logits: torch.Tensor,
           k: int) -> pa.Table:
    """One shard's rows: the top-k of the ensemble's probabilities (ids, fp16 probs and logits) per crop."""
    ids, top_probs, top_logits, rest = top_k_soft_labels(probs, logits, k)
    k = ids.shape[1]
    n = len(sample_ids)

    def fixed(values, width, typ):
        flat = pa.array(np.ascontiguousarray(values, dtype=typ).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, width)

    mix_ids = np.full(n, -1, np.int64) if mix_ids is None else np.asarray(mix_ids, np.int64)
    mix_crops = np.zeros((n, 5), np.int32) if mix_crops is None else np.asarray(mix_crops)
    mix_boxes = np.zeros((n, 4), np.int32) if mix_boxes is None else np.asarray(mix_boxes)
    return pa.Table.from_arrays([
        pa.array(np.asarray(sample_ids, np.int64)),
        fixed(np.asarray(crops), 5, np.int32),
        pa.array(mix_ids),
        fixed(mix_crops, 5, np.int32),
        fixed(mix_boxes, 4, np.int32),
        fixed(ids.numpy(), k, np.int32),
        fixed(top_probs.numpy(), k, np.float16),
        fixed(top_logits.numpy(), k, np.float16),
        pa.array(rest.numpy().astype(np.float16)),
    ], schema=schema(k))


def _column(table: pa.Table, name: str, width: int, dtype) -> np.ndarray:
    return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(
        -1, width)


@dataclass
class CachedPass:
    """One pass of the cache in memory: per sample id, its crop, mix record and soft labels (top-k)."""

    sample_ids: np.ndarray  # int64 [N]
    crops: np.ndarray  # int64 [N, 5]
    mix_ids: np.ndarray  # int64 [N], -1: not mixed
    mix_crops: np.ndarray  # int64 [N, 5]
    mix_boxes: np.ndarray  # int64 [N, 4]
    topk_ids: np.ndarray  # int64 [N, k]
    topk_probs: np.ndarray  # float32 [N, k]
    topk_logits: np.ndarray  # float32 [N, k]
    rest_logit: np.ndarray  # float32 [N]
    row_of: dict  # sample id -> row

    @classmethod
    def from_table(cls, table: pa.Table) -> "CachedPass":
        k = table.schema.field("topk_ids").type.list_size
        sample_ids = table.column("sample_id").to_numpy()
        return cls(sample_ids, _column(table, "crop", 5, np.int64), table.column("mix_id").to_numpy(),
                   _column(table, "mix_crop", 5, np.int64), _column(table, "mix_box", 4, np.int64),
                   _column(table, "topk_ids", k, np.int64), _column(table, "topk_probs", k, np.float32),
                   _column(table, "topk_logits", k, np.float32),
                   table.column("rest_logit").to_numpy().astype(np.float32),
                   {int(s): i for i, s in enumerate(sample_ids)})

    def row(self, sample_id: int) -> int:
        try:
            return self.row_of[int(sample_id)]
        except KeyError:
            raise CacheError(f"sample {sample_id} is not in the soft-label cache; relabel with the job's dataset "
                             "(`meal-ray relabel --config JOB`).") from None

    def rows(self, sample_ids) -> np.ndarray:
        return np.array([self.row(s) for s in sample_ids], dtype=np.int64)

    def soft_labels(self, rows: np.ndarray, num_classes: int, recovery: str = "marginal",
                    top_k: Optional[int] = None):
        """(probs, logits) float32 [B, C] for ``rows``; exact (fp16) when k == C. ``top_k`` below the stored k uses
        only the k largest (as a cache relabelled with that k would hold; the rest logit from the stored sums)."""
        ids = torch.from_numpy(self.topk_ids[rows])
        top_p = torch.from_numpy(self.topk_probs[rows])
        top_z = torch.from_numpy(self.topk_logits[rows])
        rest = torch.from_numpy(self.rest_logit[rows])
        k = ids.shape[1]
        if top_k is not None and top_k < k:  # stored sorted by probability: the first top_k columns
            total = top_z.sum(1) + rest * (num_classes - k)
            ids, top_p, top_z, k = ids[:, :top_k], top_p[:, :top_k], top_z[:, :top_k], top_k
            rest = (total - top_z.sum(1)) / (num_classes - k)
        return expand_top_k(ids, top_p, top_z, rest, num_classes, recovery)


# ----------------------------------------------------------------------------- the directory


class SoftLabelCache:
    """A cache directory: its manifest, its complete shards, checksum verification and reading a pass."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise CacheError(f"{self.root} is not a soft-label cache (no {MANIFEST}); make one with "
                             "`meal-ray relabel --config JOB --output DIR`.")
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CacheError(f"{path} is unreadable ({e}); relabel into a new directory.") from None
        if raw.get("format") != FORMAT:
            raise CacheError(f"{path} is not a meal-ray soft-label cache manifest.")
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise CacheError(f"{self.root} has cache schema v{raw.get('schema_version')}, this meal-ray reads "
                             f"v{SCHEMA_VERSION}; relabel with this version.")
        self.spec = CacheSpec.from_dict(raw["spec"])
        self.shards: dict = raw.get("shards", {})

    # ------------------------------------------------------------------ writing
    @classmethod
    def create(cls, root: str | Path, spec: CacheSpec) -> "SoftLabelCache":
        """Open ``root`` for writing ``spec``: a new cache, or the same cache to resume (else CacheMismatchError)."""
        root = Path(root)
        if (root / MANIFEST).is_file():
            cache = cls(root)
            old, new = cache.spec.to_dict(), spec.to_dict()
            if old != new:
                diff = [f"{k}: cache {old.get(k)}, now {new.get(k)}" for k in new if old.get(k) != new.get(k)]
                raise CacheMismatchError(f"{root} holds a cache made with other settings ({'; '.join(diff)}); "
                                         "relabel into another --output, or rerun with the same config to resume.")
            return cache
        if root.exists() and any(root.iterdir()):
            raise CacheError(f"{root} exists and is not a soft-label cache; give an empty or new --output.")
        root.mkdir(parents=True, exist_ok=True)
        _write_json(root / MANIFEST, {"format": FORMAT, "schema_version": SCHEMA_VERSION, "spec": spec.to_dict(),
                                      "shards": {}})
        return cls(root)

    def is_complete(self, name: str) -> bool:
        """Listed in the manifest and its file is there with the listed size (checksums: :meth:`verify`)."""
        entry = self.shards.get(name)
        path = self.root / name
        return bool(entry) and path.is_file() and path.stat().st_size == entry["bytes"]

    def add_shard(self, name: str, rows: int) -> dict:
        """List a shard file (already complete on disk) in the manifest; only one process should do this."""
        path = self.root / name
        entry = {"rows": int(rows), "bytes": path.stat().st_size, "sha256": sha256_of(path)}
        self.shards[name] = entry
        _write_json(self.root / MANIFEST, {"format": FORMAT, "schema_version": SCHEMA_VERSION,
                                           "spec": self.spec.to_dict(), "shards": self.shards})
        return entry

    # ------------------------------------------------------------------ reading
    def pass_shards(self, pass_index: int) -> list:
        prefix = f"pass-{pass_index:03d}/"
        return sorted(n for n in self.shards if n.startswith(prefix))

    def is_finished(self) -> bool:
        """Every pass has all its shards."""
        return all(len(self.pass_shards(p)) == int(self.spec.shards_per_pass.get(str(p), -1))
                   for p in range(self.spec.passes))

    def verify(self, names=None) -> None:
        """Every listed shard is present with its checksum; CacheError naming the first that is not."""
        for name in names if names is not None else sorted(self.shards):
            entry, path = self.shards[name], self.root / name
            if not path.is_file():
                raise CacheError(f"shard {name} of {self.root} is missing (manifest sha256 {entry['sha256']}); "
                                 "rerun `meal-ray relabel` with the same config and --output to rebuild it.")
            actual = sha256_of(path)
            if actual != entry["sha256"]:
                raise CacheError(f"shard {name} of {self.root} is corrupt: sha256 {actual}, manifest "
                                 f"{entry['sha256']}; delete it and rerun `meal-ray relabel` with the same config and "
                                 "--output to rebuild it.")

    def check_job(self, job: CacheSpec, sample_ids) -> None:
        """Refuse a job this cache does not fit: other teachers, data, classes, size, crops, or missing samples."""
        if not self.is_finished():
            done = len(self.shards)
            total = sum(int(v) for v in self.spec.shards_per_pass.values())
            raise CacheError(f"{self.root} is incomplete ({done} of {total} shards); finish it by rerunning "
                             "`meal-ray relabel` with the same config and --output.")
        diff = self.spec.mismatches(job)
        if diff:
            raise CacheMismatchError(f"the soft-label cache {self.root} does not fit this job: {'; '.join(diff)}. "
                                     "Relabel for this job (`meal-ray relabel --config JOB --output DIR`).")
        cached = set(self.sample_ids(0).tolist())
        missing = [int(s) for s in sample_ids if int(s) not in cached]
        if missing:
            raise CacheMismatchError(
                f"the soft-label cache {self.root} covers {len(cached)} training samples but {len(missing)} of the "
                f"job's {len(sample_ids)} are not among them (e.g. sample {missing[0]}); relabel with the job's "
                "data.train_subset.")

    def sample_ids(self, pass_index: int) -> np.ndarray:
        """The sample ids a pass covers (reads only that column)."""
        names = self.pass_shards(pass_index)
        return np.concatenate([pq.read_table(self.root / n, columns=["sample_id"]).column("sample_id").to_numpy()
                               for n in names]) if names else np.zeros(0, np.int64)

    def load_pass(self, pass_index: int) -> CachedPass:
        names = self.pass_shards(pass_index)
        self.verify(names)
        table = pa.concat_tables([pq.read_table(self.root / n) for n in names])
        return CachedPass.from_table(table)
