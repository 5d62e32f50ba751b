"""Relabel at the teachers' own speed on one GPU, measured in one run: `meal-ray relabel` with its crops rendered in the
actor (``data.loader_workers`` 0) and by DataLoader worker processes, against the same teachers alone.

    python bench/bench_relabel_limit.py                 # one GPU: the paper's 224 teachers (~3 min on an H200)
    python bench/bench_relabel_limit.py --tiny --workers 1 --passes 2   # this code on a CPU, tiny teachers

With random weights (``pretrained: false``) and a synthetic folder of 1000 classes of 320 px JPEGs (gpu_check.py's),
jobs/imagenet-resnet50-224.yaml's data and crops, its teachers (senet154 + resnet152s) in-process
(``teachers.source: local``), one relabel actor:

1. the teachers alone: crops/s of the ensemble's forward on crops rendered beforehand, in chunks of relabel's CHUNK,
   in this process (the relabel's ceiling); and one actor's draw + decode + render on one thread;
2. `meal-ray relabel --actors 1` with each ``data.loader_workers`` value given: crops/s between its first and last
   finished shard (start-up left out), and that / the teachers alone (the issue's goal: >= 0.9);
3. that the caches' first shard is the same bytes whichever way its crops were rendered.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_cache import _machine  # noqa: E402
from bench_relabel_scale import timed_relabel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _job(root: Path, images: Path, tiny: bool, workers: int):
    from meal_ray.config import load_config

    job = yaml.safe_load((ROOT / "jobs" / "imagenet-resnet50-224.yaml").read_text())
    job["data"].update(root=str(images), loader_workers=workers)
    job["student"]["pretrained"] = False
    teachers = ("test_resnet", "test_efficientnet") if tiny else ("senet154.gluon_in1k", "resnet152s.gluon_in1k")
    job["teachers"] = {"source": "local", "models": [{"model": m, "pretrained": False} for m in teachers]}
    job["run"].update(num_workers=1, cpus_per_worker=1, use_gpu=torch.cuda.is_available())
    job["run"].pop("label_selector", None)
    if tiny:
        job["data"]["image_size"] = 64
    path = root / f"job-{workers}.yaml"
    path.write_text(yaml.safe_dump(job))
    return load_config(str(path))


def teachers_alone(cfg, root: Path, chunks: int = 6) -> dict:
    """1: the ensemble's crops/s on pre-rendered chunks, and one thread's draw + decode + render crops/s."""
    from meal_ray.train.relabel import CHUNK, ShardLabeler

    labeler = ShardLabeler(cfg.to_dict(), str(root / "alone"), 5)
    ids = labeler.all_ids[:CHUNK * chunks]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    start = time.perf_counter()
    rendered = [labeler._prepare(0, ids[lo:lo + CHUNK])[1] for lo in range(0, len(ids), CHUNK)]
    render = len(ids) / (time.perf_counter() - start)
    labeler._teachers(rendered[0])
    sync()
    start = time.perf_counter()
    for batch in rendered:
        labeler._teachers(batch)
    sync()
    return {"teachers": len(ids) / (time.perf_counter() - start), "render_one_thread": render}


def first_shard_digest(cache: Path) -> str:
    return hashlib.sha256((cache / "pass-000" / "shard-00000.parquet").read_bytes()).hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="0,8", help="data.loader_workers values to relabel with (comma-separated)")
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=3, help="training images per class (1000 classes)")
    parser.add_argument("--tiny", action="store_true", help="tiny teachers at 64 px: a CPU check of this script")
    args = parser.parse_args(argv)
    import ray
    from gpu_check import synthetic_image_folder

    root = Path(tempfile.mkdtemp(prefix="bench-relabel-limit-"))
    images = synthetic_image_folder(root / "images", 320, args.per_class)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"# relabel at the limit: {_machine()}, {device}")
    workers = [int(w) for w in args.workers.split(",")]
    alone = teachers_alone(_job(root, images, args.tiny, workers[0]), root)
    print(f"teachers alone (both, batch of CHUNK): {alone['teachers']:.0f} crops/s; draw + decode + render on one "
          f"thread: {alone['render_one_thread']:.0f} crops/s")
    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    digests = {}
    try:
        for w in workers:
            cfg = _job(root, images, args.tiny, w)
            shard = args.per_class * 1000  # one shard per pass
            run = timed_relabel(cfg, root / f"cache-{w}", args.passes, shard, 1, None)
            digests[w] = first_shard_digest(root / f"cache-{w}")
            print(f"meal-ray relabel, data.loader_workers {w}: {run['steady']:.0f} crops/s between shards "
                  f"({run['whole']:.0f} with start-up) = {run['steady'] / alone['teachers']:.2f}x the teachers alone "
                  f"(goal 0.9)")
    finally:
        ray.shutdown()
    same = len(set(digests.values())) == 1
    print(f"first shard the same bytes with every loader_workers value: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
