"""The served path against hard labels and in-process teachers, measured in one run on one machine.

    .venv/bin/pip install -e '.[bench]'                # psutil, for the CPU each process used
    .venv/bin/python bench/bench_served.py            # ~10 min on 2 cores
    .venv/bin/python bench/bench_served.py --quick    # a smoke run (small subset; ratios are noisy)
    .venv/bin/python bench/bench_served.py --overhead # only 0, 1 and 1b below (~2 min)
    .venv/bin/python bench/bench_served.py --epoch-start  # only 5 below (~3 min)

Every arm trains the same student (the demo's mobilenetv3_small_050 at 64 px, batch 128, CutMix) with the same
engine in this process for one epoch after a warm-up epoch; only the soft-label source changes. Teachers are either
real (resnet18 + resnet10t at 32 px, random weights: speed does not care) or *emulated*: Serve replicas that sleep
as a teacher of a given throughput would compute (``args.emulate``), so the protocol's own cost is measured without
the teachers taking the student's cores. Prints, as measured here (nothing is hard-coded):

0. distill with soft labels that cost nothing (MEAL V2's own loss and discriminator) / hard labels;
1. served (emulated teachers, capacity 1.25x the demand) / hard labels (teachers.source none): goal >= 0.95; with
   the CPU each process used per 100 images, and a control: the free soft labels beside a busy loop taking the cores
   the served path's other processes took (served / control = what the protocol costs the student's own process);
   1b. the same three with the student on half the cores and Ray's and Serve's processes on the other half (the
   student node of a cluster whose teachers run elsewhere);
2. served / local with real teachers sharing this machine's cores: goal >= 0.9;
3. teacher wait fraction against the prefetch window (1, 2, 4, 8 batches in flight);
4. emulated replicas 1 -> 2 when the teachers are the bottleneck at both counts: goal >= 1.8x;
5. `meal-ray plan` applied: the planned replica count of emulated teachers, and the wait it gives (goal < 3%), also
   on 4x longer epochs; the whole epoch's wait against the steady one (after its first batch): the window asks for
   the next epoch's first batches while this one's last steps train, so an epoch start waits no round trip;
6. request bytes per sample, pixels vs crop boxes (bench_wire.py);
7. Ray Train workers 1 -> 2 (hard labels, the whole job path).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
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


def cpu_times() -> dict:
    """CPU seconds so far of every process on the machine (by pid) and of each thread of this one (by tid)."""
    import psutil

    procs = {}
    for p in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        t = p.info["cpu_times"]
        if t is not None:
            procs[p.pid] = (process_label(p), t.user + t.system)
    me = psutil.Process()
    threads = {t.id: t.user_time + t.system_time for t in me.threads()}
    return {"procs": procs, "threads": threads, "wall": time.perf_counter()}


SELF = "this process (student + client)"


def process_label(p) -> str:
    """A process by what it is: this one, a Serve replica by deployment, Ray's daemons."""
    if p.pid == os.getpid():
        return SELF
    cmd = " ".join(p.info["cmdline"] or [])
    for key, label in (("ServeReplica:", None), ("ServeController", "Serve controller"), ("raylet", "raylet"),
                       ("gcs_server", "GCS"), ("ray::", "other Ray workers")):
        if key in cmd:
            return label or "replica " + cmd.split(key)[1].split()[0].split(":")[-1]
    return "other (Ray's Python daemons, the OS, ...)"


def thread_label(tid: int) -> str:
    try:
        return Path(f"/proc/self/task/{tid}/comm").read_text().strip()
    except OSError:
        return "gone"


def cpu_used(before: dict, after: dict, images: int) -> dict:
    """CPU milliseconds per 100 images, by process label and by thread name of this process, and the cores busy."""
    by_proc, by_thread = {}, {}
    for pid, (label, t) in after["procs"].items():
        by_proc[label] = by_proc.get(label, 0.0) + t - before["procs"].get(pid, (label, 0.0))[1]
    for tid, t in after["threads"].items():
        name = thread_label(tid)
        by_thread[name] = by_thread.get(name, 0.0) + t - before["threads"].get(tid, 0.0)
    per = 1e5 / images
    wall = after["wall"] - before["wall"]
    return {"procs": {k: v * per for k, v in by_proc.items() if v * per >= 1},
            "threads": {k: v * per for k, v in by_thread.items() if v * per >= 1},
            "cores_busy": sum(by_proc.values()) / wall}


@contextlib.contextmanager
def background_load(cores: float):
    """Processes keeping ``cores`` cores busy (a 10 ms duty cycle): the CPU the served path's other processes took,
    without any of the served path, to tell sharing the cores apart from what the protocol costs the student."""
    burn = ("import sys, time\nduty = float(sys.argv[1])\nwhile True:\n    t = time.perf_counter()\n"
            "    while time.perf_counter() - t < duty * 0.01: pass\n    time.sleep((1 - duty) * 0.01)\n")
    duties = [1.0] * int(cores) + ([cores - int(cores)] if cores > int(cores) else [])
    procs = [subprocess.Popen([sys.executable, "-c", burn, str(d)]) for d in duties]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


class RecordedWaits:
    """The source it wraps, recording each batch's epoch and wait: were the window to fill again at an epoch start,
    its first batch would wait a whole teacher round trip, which a short bench epoch weighs far more than an ImageNet
    epoch of 10,000 steps does; the steady wait leaves the first batch out."""

    def __init__(self, source):
        self.source, self.waits = source, []

    def attach(self, batches):
        for batch in self.source.attach(batches):
            self.waits.append((batch.epoch, batch.wait_s))
            yield batch

    def close(self) -> None:
        self.source.close()


def pin_threads(pid: int, cpus: set) -> None:
    """Every thread of ``pid`` onto ``cpus`` (threads it starts later inherit the affinity)."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except (OSError, ValueError):
            pass  # the thread ended


@contextlib.contextmanager
def student_cores_apart():
    """This process (student and Serve client) on half the cores, Ray's and Serve's processes on the rest: the
    student node of a cluster whose teachers, Serve controller and GCS run elsewhere. Yields both core counts."""
    import psutil
    import torch

    everything = set(range(os.cpu_count() or 2))
    mine = set(sorted(everything)[:max(1, len(everything) // 2)])
    rest = everything - mine or mine
    ray_procs = [p.pid for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()
                 and "ray" in " ".join(p.info["cmdline"] or [])]
    threads = torch.get_num_threads()
    for pid in ray_procs:  # raylet too: replicas started from now on inherit its cores
        pin_threads(pid, rest)
    torch.set_num_threads(len(mine))
    pin_threads(os.getpid(), mine)
    try:
        yield len(mine), len(rest)
    finally:
        for p in psutil.process_iter(["cmdline"]):
            if p.pid == os.getpid() or "ray" in " ".join(p.info["cmdline"] or []):
                pin_threads(p.pid, everything)
        torch.set_num_threads(threads)


def epoch_rate(cfg, source=None) -> dict:
    """img/s, teacher wait fraction (all, and steady: after the first batch) and CPU use of the second epoch (the
    first warms caches, threads and the teachers)."""
    from meal_ray.engine import Engine

    recorded = RecordedWaits(source) if source is not None else None
    engine = Engine.for_job(cfg, source=recorded, log=lambda s: None)
    engine.train_epoch()
    before = cpu_times()
    m = engine.train_epoch()
    cpu = cpu_used(before, cpu_times(), cfg.data.train_subset)
    epoch_s = cfg.data.train_subset / m["images_per_s"]
    waits = [w for e, w in (recorded.waits if recorded else []) if e == 1]
    steady = sum(waits[1:]) / epoch_s if waits else 0.0
    return {"img_s": m["images_per_s"], "wait": m.get("teacher_wait_frac", 0.0), "steady_wait": steady, "cpu": cpu,
            "retries": m.get("teacher_retries", 0)}


def print_cpu(name: str, r: dict) -> None:
    cpu = r["cpu"]
    print(f"   CPU ms per 100 images, {name} ({cpu['cores_busy']:.2f} of {os.cpu_count()} cores busy): "
          + ", ".join(f"{k} {v:.0f}" for k, v in sorted(cpu["procs"].items(), key=lambda kv: -kv[1])))
    print("     threads of this process: "
          + ", ".join(f"{k} {v:.0f}" for k, v in sorted(cpu["threads"].items(), key=lambda kv: -kv[1])))


class FreeSoftLabels:
    """A baseline, not a teacher: every batch gets the same soft labels at no cost, so a distill epoch with it is
    MEAL V2's own price (soft cross-entropy, discriminator) on the student, and served minus this is the protocol's."""

    name = "free"

    def __init__(self, num_classes: int):
        import torch

        self.logits = torch.linspace(-1.0, 1.0, num_classes)

    def attach(self, batches):
        from dataclasses import replace

        for batch in batches:
            logits = self.logits.expand(len(batch.labels), -1)
            yield replace(batch, teacher_probs=logits.softmax(1), teacher_logits=logits, wait_s=0.0,
                          teacher_latency_s=0.0)

    def close(self) -> None:
        pass


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


def plan_applied(models: list, demand: float, subset: int) -> None:
    """5. `meal-ray plan` applied to emulated teachers of 0.5x the demand per replica: the wait of a whole epoch and
    the steady wait after its first batch (equal when no epoch start refills the window), on 1x and 4x epochs."""
    from meal_ray.train.plan import plan_replicas

    # 5. the plan, applied: replicas of 0.5x-demand teachers so they keep up with headroom 1.25
    plan = plan_replicas(demand, {"t": 0.5 * demand})[0]
    deploy(models, plan.replicas, {"crops_per_s": 0.5 * demand})
    planned = served(job(subset, "served", models))
    print(f"5. plan for teachers of 0.5x demand per replica: {plan.replicas} replicas (utilization "
          f"{100 * plan.utilization:.0f}%); measured wait {100 * planned['wait']:.1f}% "
          f"(steady {100 * planned['steady_wait']:.1f}%; goal < 3%), "
          f"{planned['img_s']:.0f} img/s = {planned['img_s'] / demand:.2f} of hard labels")
    longer = served(job(4 * subset, "served", models))  # 4x the steps: any epoch-start wait weighs 4x less
    print(f"   same plan, {4 * subset}-image epochs: measured wait {100 * longer['wait']:.1f}% (steady "
          f"{100 * longer['steady_wait']:.1f}%)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=6000, help="training images per epoch")
    parser.add_argument("--quick", action="store_true", help="1024 images: a smoke run, noisy ratios")
    parser.add_argument("--overhead", action="store_true",
                        help="only hard labels vs served with emulated teachers, with where the CPU goes")
    parser.add_argument("--epoch-start", action="store_true",
                        help="only item 5: the planned teachers' whole-epoch wait against the steady wait")
    args = parser.parse_args(argv)
    subset = 1024 if args.quick else args.subset

    import ray
    from bench_wire import measure as wire

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
        if args.epoch_start:
            plan_applied(models, demand, subset)
            return 0
        print_cpu("hard labels", hard)
        cfg = job(subset, "local", models)
        free = epoch_rate(cfg, FreeSoftLabels(cfg.student.num_classes))
        print(f"0. distill with soft labels that cost nothing (MEAL V2's own loss and discriminator): "
              f"{free['img_s']:.0f} img/s = {free['img_s'] / demand:.2f} of hard labels; the served path's own cost "
              "is served / this")
        print_cpu("free soft labels", free)

        # 1. emulated teachers with capacity to spare: what the protocol costs the student
        deploy(models, 1, {"crops_per_s": 1.25 * demand})
        emu = served(job(subset, "served", models))
        print(f"1. served, emulated teachers at 1.25x demand: {emu['img_s']:.0f} img/s, wait "
              f"{100 * emu['wait']:.1f}% (steady {100 * emu['steady_wait']:.1f}%) -> served / hard = "
              f"{emu['img_s'] / demand:.2f} (goal >= 0.95; EDL 0.83); "
              f"served / free soft labels = {emu['img_s'] / free['img_s']:.2f}")
        print_cpu("served", emu)
        others = sum(v for k, v in emu["cpu"]["procs"].items() if k != SELF) * emu["img_s"] / 1e5
        with background_load(others):
            loaded = epoch_rate(cfg, FreeSoftLabels(cfg.student.num_classes))
        print(f"   control: soft labels that cost nothing, beside a busy loop taking the {others:.2f} cores the served "
              f"path's other processes took: {loaded['img_s']:.0f} img/s -> served / this = "
              f"{emu['img_s'] / loaded['img_s']:.2f} (what the protocol costs the student's own process; the rest of "
              "the gap is these cores being shared)")
        emu_direct = served(job(subset, "served", models, client="direct"))
        print(f"   same with teachers.client=direct (one hop): {emu_direct['img_s']:.0f} img/s, wait "
              f"{100 * emu_direct['wait']:.1f}% -> served / hard = {emu_direct['img_s'] / demand:.2f}")
        print_cpu("direct", emu_direct)
        with student_cores_apart() as (mine, rest):
            apart = epoch_rate(job(subset, "none", models))
            apart_free = epoch_rate(cfg, FreeSoftLabels(cfg.student.num_classes))
            deploy(models, 1, {"crops_per_s": 1.25 * apart["img_s"]})
            apart_served = served(job(subset, "served", models))
        print(f"1b. the student on {mine} core(s) of its own, Ray and Serve on the other {rest} (teachers elsewhere): "
              f"hard labels {apart['img_s']:.0f} img/s, free soft labels {apart_free['img_s']:.0f}, served (emulated "
              f"at 1.25x) {apart_served['img_s']:.0f}, wait {100 * apart_served['wait']:.1f}% -> served / hard = "
              f"{apart_served['img_s'] / apart['img_s']:.2f} (goal >= 0.95), served / free = "
              f"{apart_served['img_s'] / apart_free['img_s']:.2f}")
        print_cpu("served, cores apart", apart_served)
        if args.overhead:
            return 0
        deploy(models, 1, {"crops_per_s": 1.25 * demand}, data=True)
        emu_crops = served(job(subset, "served", models, request="crops"))
        print(f"   same with crop-box requests: {emu_crops['img_s']:.0f} img/s -> served / hard = "
              f"{emu_crops['img_s'] / demand:.2f}")

        # 3. the prefetch window
        waits = {}
        for k in (1, 2, 4, 8):
            waits[k] = served(job(subset, "served", models, prefetch=k))
        print("3. teacher wait fraction vs prefetch window (steady: after each epoch's first batch): " + ", ".join(
            f"{k}: {100 * r['wait']:.1f}% (steady {100 * r['steady_wait']:.1f}%, {r['img_s']:.0f} img/s)"
            for k, r in waits.items()))

        # 4. teacher-bound: replicas 1 -> 2, each replica slow enough that two still cannot feed the student's
        # served pace (item 1), so both points measure the teachers
        rate = 0.4 * emu["img_s"]
        scale = {}
        for replicas in (1, 2):
            deploy(models, replicas, {"crops_per_s": rate})
            scale[replicas] = served(job(subset, "served", models, prefetch=8))
        print(f"4. emulated teachers at {rate:.0f} crops/s per replica (0.4x the served pace of item 1): 1 replica "
              f"{scale[1]['img_s']:.0f} img/s, 2 replicas {scale[2]['img_s']:.0f} img/s -> "
              f"{scale[2]['img_s'] / scale[1]['img_s']:.2f}x (goal >= 1.8x)")

        plan_applied(models, demand, subset)

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
