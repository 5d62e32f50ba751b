"""Teachers and students on separate nodes, measured in one run: does separation give the student its hard-label pace?

    .venv/bin/python bench/bench_cluster.py            # over 12 min on 2 cores
    .venv/bin/python bench/bench_cluster.py --quick    # a smoke run (small epochs; ratios are noisy)
    .venv/bin/python bench/bench_cluster.py --rounds 3 --subset 20000  # sections 0-1 three times, medians (~40 min)
    .venv/bin/python bench/bench_cluster.py --inline-requests  # requests passed inside the call (see --help)

Starts the cluster shape meal-ray is for on this one machine, each node a `ray start` under `taskset` so its
processes (and the workers its raylet starts) stay on cores of its own: a head (GCS, Serve controller, this driver;
no CPUs for tasks), a teacher node (label meal-ray.io/pool=teachers) and a student node (meal-ray.io/pool=students)
on disjoint cores. Every arm is a real Ray Train job (`run_job`, 1 worker, `run.label_selector` = the student pool)
training the demo's student (mobilenetv3_small_050 at 64 px, batch 128, CutMix) for two epochs; the second epoch's
img/s and teacher wait are its Ray Train metrics. Teachers are a Serve app on the teacher pool (every replica's
`label_selector`). Prints, as measured here:

0. the student in one process on the student node: hard labels, and soft labels that cost nothing (MEAL V2's own
   price); served with emulated teachers that answer at once (the served path's ceiling on this node);
1. served with real teachers whose capacity suffices (test_resnet + test_efficientnet, random weights; their crops/s
   on one core measured first) / hard labels: goal >= 0.95, teacher wait goal < 3%; also with crop-box requests;
2. emulated replicas 1 -> 2 (each at 0.4x the student's pace, so the teachers are the bottleneck at both counts):
   goal >= 1.8x;
3. `meal-ray plan`'s model checked (bench_plan_model.check_plan_model): predicted vs measured student img/s and
   teacher utilisation with emulated teachers at known rates, student-bound, balanced and teacher-bound: goal within
   10%;
and where every actor ran (Ray's state: actor -> node -> pool), so the separation is shown, not assumed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_cache import _machine as machine  # noqa: E402
from bench_cache import _teachers as random_teachers  # noqa: E402
from bench_plan_model import check_plan_model  # noqa: E402

BIN = Path(sys.executable).parent
APP = "bench-cluster-teachers"
POOL = "meal-ray.io/pool"


def free_ports(n: int) -> list:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalCluster:
    """Ray nodes on this machine, each a `ray start --block` under `taskset -c <cores>` with ports of its own."""

    def __init__(self, temp: Path):
        self.temp, self.procs, self.address = temp, [], None

    def start(self, cores: str, cpus: float, labels: str = "", head: bool = False) -> None:
        ports = free_ports(9)
        command = ["taskset", "-c", cores, str(BIN / "ray"), "start", "--block", f"--num-cpus={cpus:g}",
                   f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
                   f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
                   f"--metrics-export-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}",
                   # workers' ports in a band of their own, below the ephemeral ports the others came from
                   f"--min-worker-port={20000 + 1000 * len(self.procs)}",
                   f"--max-worker-port={20400 + 1000 * len(self.procs)}",
                   "--disable-usage-stats", "--object-store-memory=200000000"]
        if head:
            command += ["--head", f"--port={ports[7]}", "--include-dashboard=false", f"--temp-dir={self.temp}"]
            self.address = f"127.0.0.1:{ports[7]}"
        else:
            command += [f"--address={self.address}"]
        if labels:
            command += [f"--labels={labels}"]
        env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{BIN}:{os.environ.get('PATH', '')}",
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
        log_path = self.temp.with_name(self.temp.name + f"-node{len(self.procs)}.log")
        for attempt in range(3):  # a node on a busy core sometimes misses Ray's registration deadline: start it again
            log = open(log_path, "w")
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            while proc.poll() is None and "Ray runtime started" not in log_path.read_text():
                time.sleep(0.5)
            if proc.poll() is None:
                break
            print(f"(a node did not start, attempt {attempt + 1}: see {log.name})", flush=True)
        self.procs.append(proc)
        if head:  # the GCS answers: nodes can join
            port = int(self.address.rsplit(":", 1)[1])
            deadline = time.monotonic() + 120
            while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
                if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the head did not start: see {log_path}")
                time.sleep(0.5)

    def stop(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def wait_nodes(count: int, timeout_s: float = 120) -> None:
    import ray

    deadline = time.monotonic() + timeout_s
    while sum(n["Alive"] for n in ray.nodes()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {sum(n['Alive'] for n in ray.nodes())} of {count} nodes joined")
        time.sleep(0.5)


def teachers(root: Path) -> list:
    """Two light real teachers (test_resnet, test_efficientnet at 32 px; random weights: speed does not care)."""
    archs = ("test_resnet", "test_efficientnet")
    return [dict(t, name=t["model"].replace("_", "-")) for t in random_teachers(root, archs)]


def job(root: Path, name: str, subset: int, source: str, models: list, prefetch: int = 4, request: str = "pixels"):
    from meal_ray.config import load_config

    return load_config(data=dict(
        name=name, mode="distill" if source != "none" else "pretrain",
        data=dict(dataset="fashion-mnist", image_size=64, crop_scale=[0.85, 1.0], crop_ratio=[0.9, 1.1], crop_pct=1.0,
                  mean=[0.2860], std=[0.3530], train_subset=subset, val_subset=500),
        student=dict(model="mobilenetv3_small_050", num_classes=10),
        teachers=dict(source=source, models=[{"model": t["model"], "weights": t["weights"]} for t in models]
                      if source != "none" else [], app_name=APP, prefetch=prefetch, request=request),
        optim=dict(epochs=2, batch_size=128, lr=0.05, cutmix=True),
        run=dict(num_workers=1, cpus_per_worker=1, seed=0, log_every=0, label_selector={POOL: "students"},
                 output=str(root / name), tracking_uri=f"sqlite:///{root / 'mlflow.db'}")))


def deploy(root: Path, models: list, replicas: int = 1, emulate=None, data: bool = False) -> None:
    """The teachers as a Serve app on the teacher pool (as `serve deploy` of a config would), replacing any earlier."""
    from ray import serve

    from meal_ray.serve.lifecycle import teachers_up

    with contextlib.suppress(Exception):
        serve.delete(APP)
    args = {"teachers": models, "max_batch_size": 256, "batch_wait_timeout_s": 0.002}
    if emulate:
        args["emulate"] = emulate
    if data:  # crop-box requests: the replicas read the training set and render the boxes
        args["data"] = {"dataset": "fashion-mnist"}
    teacher = {"num_cpus": 0.01 if emulate else 1, "label_selector": {POOL: "teachers"}}
    config = {"proxy_location": "Disabled", "applications": [{
        "name": APP, "import_path": "meal_ray.serve.app:build_app", "route_prefix": None, "args": args,
        "deployments": [{"name": t["name"], "num_replicas": replicas, "max_ongoing_requests": 64,
                         "ray_actor_options": teacher} for t in models]
        + [{"name": "ensemble", "max_ongoing_requests": 128,
            "ray_actor_options": {"num_cpus": 0, "label_selector": {POOL: "teachers"}}}]}]}
    path = root / f"serve-{replicas}-{'emulated' if emulate else 'real'}.yaml"
    path.write_text(yaml.safe_dump(config))
    teachers_up(path, block=False, log=lambda s: None)


def trained(cfg) -> dict:
    """The job's second epoch: img/s, teacher wait; and the pools its workers ran on."""
    from meal_ray.train import run_job

    result = run_job(cfg, log=lambda s: None)
    last = result["history"][-1]
    return {"img_s": last["images_per_s"], "wait": last.get("teacher_wait_frac", 0.0),
            "retries": last.get("teacher_retries", 0)}


def in_process(cfg, free: bool) -> dict:
    """The same student trained in one process on the student node, without Ray Train: hard labels, or soft labels
    that cost nothing (MEAL V2's loss and discriminator at no teacher cost). Second epoch's img/s."""
    import ray

    @ray.remote(num_cpus=1, label_selector={POOL: "students"})
    def epoch(cfg, free):
        import torch
        from bench_served import FreeSoftLabels  # on the nodes' PYTHONPATH (bench/)

        from meal_ray.engine import Engine

        torch.set_num_threads(1)
        engine = Engine.for_job(cfg, source=FreeSoftLabels(cfg.student.num_classes) if free else None,
                                log=lambda s: None)
        engine.train_epoch()
        return engine.train_epoch()["images_per_s"]

    return ray.get(epoch.remote(cfg, free))


def placements() -> str:
    """Where each kind of actor ran (every actor of this Ray session, dead ones too), by the pool of its node."""
    import ray

    pools = {n["NodeID"]: (n.get("Labels") or {}).get(POOL, "head") for n in ray.nodes()}
    seen: dict = {}
    for actor in ray._private.state.actors().values():  # the GCS actor table: actor -> node (no dashboard here)
        name = actor.get("ActorClassName", "?")
        kind = "train worker" if name == "RayTrainWorker" else ("teacher replica" if name.startswith(
            "ServeReplica") and not name.endswith(":ensemble") else "ingress" if name.startswith("ServeReplica")
            else None)
        if kind:
            node = (actor.get("Address") or {}).get("NodeID") or actor.get("NodeID")
            seen.setdefault(kind, set()).add(pools.get(node, "?"))
    return "; ".join(f"{k} on {', '.join(sorted(v))}" for k, v in sorted(seen.items()))


def teacher_capacity(models: list, crop: int, seconds: float) -> float:
    """The ensemble's crops/s on one core: each crop goes through both teachers, whose replicas share the core."""
    import torch

    from meal_ray.config import teacher_spec
    from meal_ray.train.plan import measure_teacher

    torch.set_num_threads(1)
    times = [1 / measure_teacher(teacher_spec(t), crop, 1, 128, None, seconds) for t in models]
    return 1 / sum(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=6000, help="training images per epoch")
    parser.add_argument("--quick", action="store_true", help="1024 images: a smoke run, noisy ratios")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure the hard-label, ceiling, served and crop-box arms this many times, in turn, and "
                        "print each round's ratios and their medians (sections 2-3 take the median hard-label pace): "
                        "on a shared VM one arm's img/s can move 5-10%% between identical runs")
    parser.add_argument("--inline-requests", action="store_true",
                        help="start the nodes with RAY_max_direct_call_object_size=4000000, so a batch's pixels go to "
                        "the ingress inside the call (gRPC) instead of through both nodes' object stores")
    args = parser.parse_args(argv)
    subset = 1024 if args.quick else args.subset
    if args.inline_requests:  # every node's Ray reads it at `ray start` (the nodes inherit this environment)
        os.environ["RAY_max_direct_call_object_size"] = "4000000"
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        print("bench_cluster needs at least 2 cores (a student core and a teacher core)")
        return 2
    student_cores = ",".join(map(str, cores[:len(cores) // 2]))
    other_cores = ",".join(map(str, cores[len(cores) // 2:]))
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    temp = Path(f"/tmp/rbc{os.getpid()}")  # short: Ray's socket paths must stay under 108 bytes
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, capture_output=True)
    os.sched_setaffinity(0, {int(c) for c in other_cores.split(",")})  # this driver beside the head

    models = teachers(root)
    capacity = teacher_capacity(models, 64, 1.5 if args.quick else 4.0)
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d')}")
    inline = os.environ.get("RAY_max_direct_call_object_size")
    print("requests: " + (f"inline up to {inline} bytes" if inline else "Ray's default (over 100 KB through the "
                                                                          "object store)"))
    print(f"nodes: head (no task CPUs) + teacher node ({POOL}=teachers) on cores {other_cores}, student node "
          f"({POOL}=students) on cores {student_cores}; each a `ray start` under taskset")
    print(f"student mobilenetv3_small_050 at 64 px, batch 128, CutMix, {subset} images per epoch, 1 Ray Train worker "
          f"on the student node; second epoch timed. Teachers test_resnet + test_efficientnet: {capacity:.0f} crops/s "
          "together on one core (measured here)\n")
    cluster = LocalCluster(temp)
    try:
        cluster.start(other_cores, 0, head=True)
        cluster.start(other_cores, 4, labels=f"{POOL}=teachers")
        cluster.start(student_cores, len(student_cores.split(",")), labels=f"{POOL}=students")
        from meal_ray.cluster import ensure_ray

        os.environ.pop("RAY_AUTH_MODE", None)
        ensure_ray(cluster.address)  # sends ~/.ray/auth_token, as the nodes started with RAY_AUTH_MODE=token expect
        wait_nodes(3)

        local_hard = in_process(job(root, "local-hard", subset, "none", models), free=False)
        local_free = in_process(job(root, "local-free", subset, "local", models), free=True)
        print(f"0. the same student in one process on the student node (no Ray Train): hard {local_hard:.0f} img/s, "
              f"soft labels that cost nothing {local_free:.0f} -> MEAL V2's own price (loss + discriminator): "
              f"free / hard = {local_free / local_hard:.2f}")
        ratios: dict = {"ceiling": [], "real": [], "crops": []}
        hards = []
        for r in range(args.rounds):
            tag = f"-{r}" if r else ""  # every run gets an output dir of its own
            if args.rounds > 1:
                print(f"round {r + 1}/{args.rounds}:")
            hard = trained(job(root, f"hard{tag}", subset, "none", models))
            hards.append(hard["img_s"])
            print(f"   hard labels (teachers.source none): {hard['img_s']:.0f} img/s on the student node")
            deploy(root, models, emulate={"crops_per_s": 1e9})
            instant = trained(job(root, f"served-instant{tag}", subset, "served", models))
            ratios["ceiling"].append(instant["img_s"] / hard["img_s"])
            print(f"   served, emulated teachers that answer at once: {instant['img_s']:.0f} img/s, wait "
                  f"{100 * instant['wait']:.1f}% -> served / hard = {ratios['ceiling'][-1]:.2f} (the served "
                  "path's ceiling on this node)")
            deploy(root, models)
            real = trained(job(root, f"served-real{tag}", subset, "served", models))
            ratios["real"].append(real["img_s"] / hard["img_s"])
            print(f"1. served, real teachers on the teacher node (capacity {capacity:.0f} crops/s = "
                  f"{capacity / hard['img_s']:.2f}x the demand): {real['img_s']:.0f} img/s, teacher wait "
                  f"{100 * real['wait']:.1f}% (goal < 3%) -> served / hard = {ratios['real'][-1]:.2f} "
                  "(goal >= 0.95)")
            deploy(root, models, data=True)
            crops = trained(job(root, f"served-crops{tag}", subset, "served", models, request="crops"))
            ratios["crops"].append(crops["img_s"] / hard["img_s"])
            print(f"   same with crop-box requests (teachers.request: crops; the replicas render the crops): "
                  f"{crops['img_s']:.0f} img/s, teacher wait {100 * crops['wait']:.1f}% -> served / hard = "
                  f"{ratios['crops'][-1]:.2f}")
        hard = {"img_s": statistics.median(hards)}
        if args.rounds > 1:
            print(f"medians over {args.rounds} rounds (each ratio within its round): hard {hard['img_s']:.0f} img/s, "
                  f"ceiling {statistics.median(ratios['ceiling']):.2f}, served with real teachers "
                  f"{statistics.median(ratios['real']):.2f} (goal >= 0.95), crop-box requests "
                  f"{statistics.median(ratios['crops']):.2f}")
        rate = 0.4 * hard["img_s"]
        scale = {}
        for replicas in (1, 2):
            deploy(root, models, replicas, {"crops_per_s": rate})
            scale[replicas] = trained(job(root, f"emulated-{replicas}", subset, "served", models, prefetch=8))
        print(f"2. emulated teachers at {rate:.0f} crops/s per replica (0.4x the student's pace): 1 replica "
              f"{scale[1]['img_s']:.0f} img/s, 2 replicas {scale[2]['img_s']:.0f} img/s -> "
              f"{scale[2]['img_s'] / scale[1]['img_s']:.2f}x (goal >= 1.8x)")
        print("3. the planner's model (demand: the hard-label run above), emulated teachers at known rates:")

        runs = itertools.count()  # the ceiling is measured twice: every run gets an output dir of its own

        def measure(rate: float, replicas: int) -> dict:
            deploy(root, models, replicas, {"crops_per_s": rate})
            return trained(job(root, f"plan-{next(runs)}-{rate:.0f}-{replicas}", subset, "served", models,
                               prefetch=8))

        check_plan_model(hard["img_s"], models, measure)
        print(f"where things ran (Ray's actor table): {placements()}")
    finally:
        import ray

        ray.shutdown()
        cluster.stop()
        shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
