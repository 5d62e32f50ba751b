"""`meal-ray relabel`: the teachers label every crop of P passes once, into a soft-label cache (a Ray Data job).

The driver checks the job and the output (a new cache, or the same one to resume), lists the
shards still missing, and runs them through a Ray Data actor pool: each actor holds the
dataset and either the job's teachers in-process (``teachers.source: local``, ``num_gpus``
per actor with ``run.use_gpu``) or a handle to the served teacher application
(``teachers.source: served``: the shared teacher pool). An actor draws crop records a chunk at
a time (:func:`meal_ray.cache.draw_crop_records`) and renders them on its DataLoader (in worker
processes with ``data.loader_workers``), asks the teachers, and writes the shard file atomically;
the driver alone lists finished shards, with their checksums, in the manifest. A killed relabel
loses only the shards in flight; rerunning it finishes the rest.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from meal_ray.cache import SoftLabelCache, draw_crop_records, encode, shard_name, write_shard_file
from meal_ray.cluster import ensure_ray, quiet_ray_data
from meal_ray.config import JobConfig, load_config
from meal_ray.data.datasets import load_datasets, sample_by_id, sample_ids
from meal_ray.errors import ConfigError
from meal_ray.progress import format_duration
from meal_ray.source_registry import source_class
from meal_ray.sources.cache import cutmix_spec, job_cache_spec

DEFAULT_SHARD_SIZE = 8192
CHUNK = 256  # crops per teacher request inside an actor (a power of two: loader workers render pieces of it)


def default_top_k(num_classes: int) -> int:
    """Exact soft labels for small class counts, FKD's top-5 for ImageNet-sized ones."""
    return num_classes if num_classes <= 100 else 5


class _RenderedChunks(Dataset):
    """DataLoader dataset of one labeler: a key ``(pass, sample ids)`` -> those samples' crop records and uint8
    crops, on the loader's worker processes (forked: the labeler is not pickled)."""

    def __init__(self, labeler: "ShardLabeler"):
        self.labeler = labeler

    def __getitem__(self, key):
        drawn, pixels = self.labeler._prepare(*key)
        drawn.partner_images = {}  # rendered already: not sent back
        return drawn, pixels


class _Keys(Sampler):
    """The chunks the loader renders next, set before each pass over it (its workers outlive the shard)."""

    def __init__(self):
        self.keys: list = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def _as_is(item):
    return item


class ShardLabeler:
    """Ray Data actor: labels whole shards (one row per shard: pass, shard, sample ids) and writes their files."""

    def __init__(self, config: dict, root: str, k: int):
        cfg = load_config(data=config)
        self.cfg, self.root, self.k = cfg, root, k
        self.train, _, _ = load_datasets(cfg.data, cfg.student.num_classes)
        self.all_ids = sample_ids(self.train).numpy()
        self.cutmix, self.size = cutmix_spec(cfg.optim), cfg.data.image_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.served = None
        if cfg.teachers.source == "served":
            from meal_ray.sources.served import ServedSoftLabels

            self.served = ServedSoftLabels(cfg.teachers.app_name, prefetch=cfg.teachers.prefetch)
        else:
            from meal_ray.ensemble import TeacherSet

            self.ensemble = TeacherSet.from_config(cfg.teachers).load().to(self.device)
        # Crops are decoded and rendered by a DataLoader: in this process (data.loader_workers 0), or by that many
        # worker processes (a GPU setting) that prepare the coming crops while the teachers label these, in pieces of
        # about CHUNK / workers crops so that all of them start at once. Records are drawn from (seed, pass, sample
        # id) and the teachers always see CHUNK crops at a time, so the shards are the same bytes whichever way.
        workers = cfg.data.loader_workers
        self.piece = max(CHUNK >> max(workers - 1, 0).bit_length(), 1)  # a power of two: CHUNK is a whole number
        self._keys = _Keys()
        self._rendered = DataLoader(_RenderedChunks(self), sampler=self._keys, batch_size=None, collate_fn=_as_is,
                                    num_workers=workers, persistent_workers=workers > 0,
                                    prefetch_factor=2 if workers else None)

    def _image(self, sample_id: int) -> torch.Tensor:
        return sample_by_id(self.train, sample_id)[0]

    def _prepare(self, p, chunk: np.ndarray):
        """Crop records of a chunk of samples and their crops rendered at the student's size."""
        d = self.cfg.data
        images = [self._image(i) for i in chunk.tolist()]
        drawn = draw_crop_records(chunk, images, int(p), seed=self.cfg.run.seed, scale=d.crop_scale,
                                  ratio=d.crop_ratio, image_size=self.size, cutmix=self.cutmix,
                                  partner_ids=self.all_ids, image_of=self._image)
        return drawn, drawn.render_all(images, self.size, d.interpolation)

    def _teachers(self, images: torch.Tensor):
        if self.served is not None:
            from meal_ray.serve.protocol import TeacherReply, TeacherRequest

            reply = self.served.handle.remote(TeacherRequest.from_images(images)).result(
                timeout_s=self.served.timeout_s)
            return TeacherReply.parse(reply, len(images)).tensors()
        probs, logits = self.ensemble(images.to(self.device))
        return probs.float().cpu(), logits.float().cpu()

    def _chunks(self, p, ids: np.ndarray):
        """``(records, crops)`` of CHUNK samples at a time, in order, joined from the loader's pieces."""
        self._keys.keys = [(int(p), ids[lo:lo + self.piece]) for lo in range(0, len(ids), self.piece)]
        per_chunk = CHUNK // self.piece
        pieces: list = []
        for piece in self._rendered:
            pieces.append(piece)
            if len(pieces) == per_chunk:
                yield pieces
                pieces = []
        if pieces:
            yield pieces

    def __call__(self, batch: dict) -> dict:
        names, rows, seconds = [], [], []
        for p, shard, ids in zip(batch["pass"], batch["shard"], batch["ids"]):
            start = time.perf_counter()
            ids = np.asarray(ids, dtype=np.int64)
            records, probs, logits = [], [], []
            for pieces in self._chunks(p, ids):
                pr, lg = self._teachers(torch.cat([pixels for _, pixels in pieces]))
                records.extend(drawn for drawn, _ in pieces)
                probs.append(pr)
                logits.append(lg)
            table = encode(ids, *(np.concatenate([getattr(r, f) for r in records])
                                  for f in ("crops", "mix_ids", "mix_crops", "mix_boxes")),
                           torch.cat(probs), torch.cat(logits), self.k)
            name = shard_name(int(p), int(shard))
            write_shard_file(self.root, name, table)
            names.append(name)
            rows.append(len(ids))
            seconds.append(time.perf_counter() - start)
        return {"name": np.asarray(names), "rows": np.asarray(rows), "seconds": np.asarray(seconds)}


def relabel(cfg: JobConfig, output: str | Path, passes: int, k: Optional[int] = None,
            shard_size: int = DEFAULT_SHARD_SIZE, actors: Optional[int] = None, address: Optional[str] = None,
            log=print, progress_suffix: Optional[Callable[[Optional[float]], str]] = None) -> dict:
    """Label ``passes`` passes of the job's training crops into the cache at ``output`` (resuming it if there).
    ``progress_suffix(eta_s)`` is appended to each progress line (the demo's whole ETA); the result's ``labelled``
    counts the crops this call labelled (0 when the cache was complete)."""
    if cfg.teachers.source not in ("local", "served"):
        raise ConfigError(f"relabel asks the teachers: set teachers.source to local or served, not "
                          f"{cfg.teachers.source!r}.")
    if passes < 1 or shard_size < 1:
        raise ConfigError(f"--passes={passes} and --shard-size={shard_size} must be >= 1.")
    num_classes = cfg.student.num_classes
    k = default_top_k(num_classes) if k is None else int(k)
    if not 1 <= k <= num_classes:
        raise ConfigError(f"--top-k={k} must be between 1 and the class count {num_classes}.")
    source = source_class(cfg.teachers.source)
    source.check_config(cfg)  # teacher names (and, in-process, weights files), before Ray starts
    train, _, _ = load_datasets(cfg.data, num_classes)
    ids = sample_ids(train).numpy()
    shards = math.ceil(len(ids) / shard_size)
    served = None
    if cfg.teachers.source == "served":  # the cache records what the application serves (its replicas' digests)
        ensure_ray(address, num_cpus=_cpus(cfg, actors))
        served = source.preflight(cfg)["teacher_set"]
    spec = job_cache_spec(cfg, train, k, passes, teacher_set=served)
    spec.shards_per_pass = {str(p): shards for p in range(passes)}
    cache = SoftLabelCache.create(output, spec)
    todo = [{"pass": p, "shard": i, "ids": ids[i * shard_size:(i + 1) * shard_size].tolist()}
            for p in range(passes) for i in range(shards) if not cache.is_complete(shard_name(p, i))]
    total = passes * shards
    log(f"[relabel] {cfg.name}: {passes} pass(es) x {len(ids)} crops, top-{k} of {num_classes} classes, "
        f"{total} shards ({total - len(todo)} already done) -> {Path(output).resolve()}")
    labelled = _run_shards(cfg, cache, todo, k, total, actors, address, log, progress_suffix) if todo else 0
    cache.verify()
    crops = sum(e["rows"] for e in cache.shards.values())
    size = sum(e["bytes"] for e in cache.shards.values())
    log(f"[relabel] done: {crops} crops in {len(cache.shards)} shards, {size / max(crops, 1):.1f} bytes per crop")
    return {"root": str(cache.root), "crops": crops, "bytes": size, "shards": len(cache.shards), "k": k,
            "passes": passes, "fingerprint": spec.teacher_set["fingerprint"], "labelled": labelled}


def _cpus(cfg: JobConfig, actors: Optional[int]) -> int:
    """Logical CPUs for an embedded Ray: the labelling actors' and the driver's."""
    return max(os.cpu_count() or 1, int((actors or cfg.run.num_workers) * cfg.run.cpus_per_worker + 1.999))


def _run_shards(cfg: JobConfig, cache: SoftLabelCache, todo: list, k: int, total: int, actors: Optional[int],
                address: Optional[str], log, progress_suffix: Optional[Callable[[Optional[float]], str]]) -> int:
    """Label the ``todo`` shards with a pool of Ray Data actors, listing each in the manifest as it lands; returns
    the crops labelled."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ensure_ray(address, num_cpus=_cpus(cfg, actors))
    if cfg.teachers.source == "local":
        source_class(cfg.teachers.source).preflight(cfg)
    actors = actors or cfg.run.num_workers
    DataContext.get_current().enable_progress_bars = False  # the [relabel] lines below show progress
    quiet_ray_data()
    ds = ray.data.from_items(todo, override_num_blocks=len(todo))
    labelled = ds.map_batches(
        ShardLabeler, batch_size=1, compute=ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"config": cfg.to_dict(), "root": str(cache.root), "k": k},
        num_cpus=cfg.run.cpus_per_worker, num_gpus=1 if cfg.run.use_gpu and cfg.teachers.source == "local" else 0)
    if "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S" not in os.environ:
        # One block is a whole shard: slow teachers, or a wait for teacher GPUs, can take longer than Ray Data's
        # 30-minute no-progress limit. The lines below show progress, and a stopped relabel resumes shard by shard.
        labelled.context.execution_no_progress_timeout_s = -1
    start, crops, done = time.perf_counter(), 0, total - len(todo)
    for row in labelled.iter_rows():
        cache.add_shard(str(row["name"]), int(row["rows"]))
        crops += int(row["rows"])
        done += 1
        elapsed = time.perf_counter() - start
        rate = crops / max(elapsed, 1e-9)
        left = sum(len(t["ids"]) for t in todo) - crops
        eta = left / max(rate, 1e-9)
        log(f"[relabel] shard {row['name']} ({done}/{total}): {rate:.0f} crops/s, ETA {format_duration(eta)}"
            + (progress_suffix(eta) if progress_suffix else ""))
    return crops
