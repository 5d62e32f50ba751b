"""The served path against hard labels and in-process teachers, measured in one run on one machine.

    .venv/bin/python bench/bench_served.py            # ~10 min on 2 cores
    .venv/bin/python bench/bench_served.py --quick    # a smoke run (small subset; ratios are noisy)

Every arm trains the same student (the demo's mobilenetv3_small_050 at 64 px, batch 128, CutMix) with the same
engine in this process for one epoch after a warm-up epoch; only the soft-label source changes. Teachers are either
real (resnet18 + resnet10t at 32 px, random weights: speed does not care) or *emulated*: Serve replicas that sleep
as a teacher of a given throughput would compute (``args.emulate``), so the protocol's own cost is measured without
the teachers taking the student's cores. Prints, as measured here (nothing is hard-coded):

1. served (emulated teachers, capacity 1.25x the demand) / hard labels (teachers.source none): goal >= 0.95;
2. served / local with real teachers sharing this machine's cores: goal >= 0.9;
3. teacher wait fraction against the prefetch window (1, 2, 4, 8 batches in flight);
4. emulated replicas 1 -> 2 when the teachers are the bottleneck: goal >= 1.8x;
5. `meal-ray plan` applied: the planned replica count of emulated teachers, and the wait it gives (goal < 3%);
6. request bytes per sample, pixels vs crop boxes (bench_wire.py);
7. Ray Train workers 1 -> 2 (hard labels, the whole job path).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_cache import _machine as machine  # noqa: E402
from bench_cache import _teachers  # noqa: E402

APP = "bench-served-teachers"


def teachers(root: Path) -> list:
    """bench_cache's two teachers (resnet18, resnet10t at 32 px), named as their deployments."""
    return [dict(t, name=t["model"]) for t in _teachers(root)]


def job(subset: int, source: str, models: list, prefetch: int = 4, request: str = "pixels", client: str = "ingress",
        **run):
    from meal_ray.config import load_config

    return load_config(data=dict(
        name="bench-served", mode="distill" if source != "none" else "pretrain",
        data=dict(dataset="fashion-mnist", image_size=64, crop_scale=[0.85, 1.0], crop_ratio=[0.9, 1.1], crop_pct=1.0,
                  mean=[0.2860], std=[0.3530], train_subset=subset, val_subset=500),
        student=dict(model="mobilenetv3_small_050", num_classes=10),
        teachers=dict(source=source, models=[{"model": t["model"], "weights": t["weights"]} for t in models]
                      if source != "none" else [], app_name=APP, prefetch=prefetch, request=request, client=client),
        optim=dict(epochs=2, batch_size=128, lr=0.05, cutmix=True),
        run=dict(dict(num_workers=1, seed=0, log_every=0), **run)))


def epoch_rate(cfg, source=None) -> dict:
    """img/s and teacher wait fraction of the second epoch (the first warms caches, threads and the teachers)."""
    from meal_ray.engine import Engine

    engine = Engine.for_job(cfg, source=source, log=lambda s: None)
    engine.train_epoch()
    m = engine.train_epoch()
    return {"img_s": m["images_per_s"], "wait": m.get("teacher_wait_frac", 0.0)}


def deploy(models: list, replicas: int = 1, emulate=None, data: bool = False, batch: int = 256) -> None:
    """The teacher application from a Serve config (as `serve deploy` would), replacing any earlier one."""
    from ray import serve

    from meal_ray.serve.lifecycle import teachers_up

    try:
        serve.delete(APP)
    except Exception:
        pass
    args = {"teachers": models, "max_batch_size": batch, "batch_wait_timeout_s": 0.002}
    if emulate:
        args["emulate"] = emulate
    if data:
        args["data"] = {"dataset": "fashion-mnist"}
    cpus = 0.01 if emulate else 1  # sleeping replicas hold no core
    config = {"proxy_location": "Disabled", "applications": [{
        "name": APP, "import_path": "meal_ray.serve.app:build_app", "route_prefix": None, "args": args,
        "deployments": [{"name": t["name"], "num_replicas": replicas, "max_ongoing_requests": 64,
                         "ray_actor_options": {"num_cpus": cpus}} for t in models]
        + [{"name": "ensemble", "max_ongoing_requests": 128, "ray_actor_options": {"num_cpus": 0}}]}]}
    path = Path(tempfile.mkdtemp(prefix="bench-served-")) / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    teachers_up(path, block=False, log=lambda s: None)


def served(cfg) -> dict:
    from meal_ray.sources.served import ServedSoftLabels

    source = ServedSoftLabels(APP, prefetch=cfg.teachers.prefetch, request=cfg.teachers.request,
                              client=cfg.teachers.client)
    try:
        return epoch_rate(cfg, source)
    finally:
        source.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=6000, help="training images per epoch")
    parser.add_argument("--quick", action="store_true", help="1024 images: a smoke run, noisy ratios")
    args = parser.parse_args(argv)
    subset = 1024 if args.quick else args.subset

    import ray
    from bench_wire import measure as wire

    from meal_ray.serve.plan import plan_replicas
    from meal_ray.sources.local import LocalSoftLabels

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="bench-served-"))
    models = teachers(root)
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d')}")
    print(f"student mobilenetv3_small_050 at 64 px, batch 128, CutMix, {subset} Fashion-MNIST images per epoch; "
          "second epoch timed\n")
    ray.init(num_cpus=(os.cpu_count() or 2) + 4, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        hard = epoch_rate(job(subset, "none", models))
        demand = hard["img_s"]
        print(f"hard labels (teachers.source none): {demand:.0f} img/s")

        # 1. emulated teachers with capacity to spare: what the protocol costs the student
        deploy(models, 1, {"crops_per_s": 1.25 * demand})
        emu = served(job(subset, "served", models))
        print(f"1. served, emulated teachers at 1.25x demand: {emu['img_s']:.0f} img/s, wait "
              f"{100 * emu['wait']:.1f}% -> served / hard = {emu['img_s'] / demand:.2f} (goal >= 0.95; EDL 0.83)")
        emu_direct = served(job(subset, "served", models, client="direct"))
        print(f"   same with teachers.client=direct (one hop): {emu_direct['img_s']:.0f} img/s, wait "
              f"{100 * emu_direct['wait']:.1f}% -> served / hard = {emu_direct['img_s'] / demand:.2f}")
        deploy(models, 1, {"crops_per_s": 1.25 * demand}, data=True)
        emu_crops = served(job(subset, "served", models, request="crops"))
        print(f"   same with crop-box requests: {emu_crops['img_s']:.0f} img/s -> served / hard = "
              f"{emu_crops['img_s'] / demand:.2f}")

        # 3. the prefetch window
        waits = {}
        for k in (1, 2, 4, 8):
            waits[k] = served(job(subset, "served", models, prefetch=k))
        print("3. teacher wait fraction vs prefetch window: " + ", ".join(
            f"{k}: {100 * r['wait']:.1f}% ({r['img_s']:.0f} img/s)" for k, r in waits.items()))

        # 4. teacher-bound: replicas 1 -> 2
        scale = {}
        for replicas in (1, 2):
            deploy(models, replicas, {"crops_per_s": 0.4 * demand})
            scale[replicas] = served(job(subset, "served", models, prefetch=8))
        print(f"4. emulated teachers at 0.4x demand per replica: 1 replica {scale[1]['img_s']:.0f} img/s, 2 replicas "
              f"{scale[2]['img_s']:.0f} img/s -> {scale[2]['img_s'] / scale[1]['img_s']:.2f}x (goal >= 1.8x)")

        # 5. the plan, applied: replicas of 0.5x-demand teachers so they keep up with headroom 1.25
        plan = plan_replicas(demand, {"t": 0.5 * demand})[0]
        deploy(models, plan.replicas, {"crops_per_s": 0.5 * demand})
        planned = served(job(subset, "served", models))
        print(f"5. plan for teachers of 0.5x demand per replica: {plan.replicas} replicas (utilization "
              f"{100 * plan.utilization:.0f}%); measured wait {100 * planned['wait']:.1f}% (goal < 3%), "
              f"{planned['img_s']:.0f} img/s = {planned['img_s'] / demand:.2f} of hard labels")

        # 2. real teachers on the same cores: served vs in-process
        deploy(models, 1)
        real = served(job(subset, "served", models))
        cfg = job(subset, "local", models)
        local = epoch_rate(cfg, LocalSoftLabels.from_config(cfg, "cpu"))
        print(f"2. real teachers sharing these cores: served {real['img_s']:.0f} img/s, local {local['img_s']:.0f} "
              f"img/s -> served / local = {real['img_s'] / local['img_s']:.2f} (goal >= 0.9)")
        # 7. Ray Train workers 1 -> 2 (hard labels, the whole job path: driver, workers, checkpoints)
        from meal_ray.train import run_job

        rates = {}
        for workers in (1, 2):
            cfg = job(subset, "none", models, num_workers=workers, cpus_per_worker=(os.cpu_count() or 2) // workers,
                      output=str(root / f"workers{workers}"), tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
            rates[workers] = run_job(cfg, log=lambda s: None)["history"][-1]["images_per_s"]
        print(f"7. Ray Train hard-label job, 1 -> 2 workers: {rates[1]:.0f} -> {rates[2]:.0f} img/s "
              f"({rates[2] / rates[1]:.2f}x; the same {os.cpu_count()} cores split between the workers)")
    finally:
        ray.shutdown()

    print("6. request bytes per sample (cloudpickle, batch 64): pixels vs crop boxes (with CutMix records)")
    for name, c, s, k in (("Fashion-MNIST 28 px", 1, 28, 10), ("Fashion-MNIST 64 px (this bench)", 1, 64, 10),
                          ("ImageNet 224 px", 3, 224, 1000)):
        m = wire(c, s, k)
        print(f"   {name}: pixels {m['request']:.0f} B, crop boxes {m['request_crops_mix']:.1f} B "
              f"({m['request'] / m['request_crops_mix']:.0f}x less); reply {m['reply']:.0f} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
