"""The cluster shape meal-ray is for, on the session's multi-node cluster (conftest.SessionCluster: a head, two
teacher nodes, a student node): the README's cluster commands as written, every teacher replica on a teacher node and
every train worker on a student node (Ray's own state: actor -> node), and placements no node can hold refused by
name before anything starts. Node losses and live rescaling are in test_faults.py (`make test-faults`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import FMNIST_DATA

from meal_ray.config import load_config
from meal_ray.errors import PlacementError
from meal_ray.placement import POOL_LABEL

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = os.path.dirname(sys.executable)
APP = "meal-ray-teachers"  # teachers.app_name of jobs/fashion-mnist-quick.yaml


def readme_block(heading: str, after: str) -> list:
    """The commands of the README's first bash block after the line containing ``after`` in section ``heading``
    (continuation lines joined, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    section = section[section.index(after):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        command = re.sub(r"\s+#\s.*$", "", line).strip()
        if command:
            commands.append(command)
    return commands


def cli_env(cluster) -> dict:
    """The environment the README's commands run in: its first block's export and the two addresses."""
    return dict(os.environ, RAY_ADDRESS=cluster.address, RAY_DASHBOARD_ADDRESS=cluster.dashboard,
                PATH=f"{BIN}:{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token")


def repo_copy(dest: Path) -> Path:
    """This repository's files as a clone holds them (tracked, or new and not ignored), to run the README's commands
    in."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    return dest


def write_fmnist_teachers(home: Path) -> None:
    """runs/fmnist-teacher-{resnet18,resnet10t}/student where the nodes started: the exports the README's Serve config
    names (random weights: the test is about where things run and what the job names, not about accuracy)."""
    import torch

    from meal_ray.models import create_model, export_model

    dc = dict(input_size=(1, 32, 32), mean=(0.2860,), std=(0.3530,), interpolation="bilinear", crop_pct=1.0)
    for i, arch in enumerate(("resnet18", "resnet10t")):
        torch.manual_seed(i)
        model = create_model(arch, num_classes=10, in_chans=1, data_config=dc)
        export_model(model.eval(), home / "runs" / f"fmnist-teacher-{arch}" / "student", dc)


class PoolWatch:
    """Polls Ray's actor state while a job runs: the pool of every node a train worker was seen on."""

    def __init__(self, cluster, prefix: str = "RayTrainWorker"):
        self.cluster, self.prefix, self.seen, self._stop = cluster, prefix, set(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.seen |= set(self.cluster.actor_pools(self.prefix))
            except Exception:  # the State API between two polls
                pass
            self._stop.wait(1.0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_readme_cluster_commands_place_teachers_and_students_on_their_pools(cluster, tmp_path):
    """The README's "On a cluster" block, as written, on a head + 2 teacher nodes + 1 student node: the teachers
    deploy on the teacher pool, the job (its driver never reads the teachers' weights: `runs/` is not uploaded)
    trains on the student pool to SUCCEEDED, and `meal-ray teachers status` shows each replica's node."""
    from mlflow.tracking import MlflowClient
    from ray import serve

    write_fmnist_teachers(cluster.home)
    repo = repo_copy(tmp_path / "repo")
    assert not (repo / "runs").exists()  # as in a fresh clone: the job has no teacher weights to read
    env, outputs = cli_env(cluster), {}
    commands = readme_block("### On a cluster", "tests/test_cluster.py` runs this block")
    assert [c.split()[:2] for c in commands] == [["serve", "deploy"], ["serve", "status"], ["ray", "job"],
                                                 ["meal-ray", "teachers"]]
    try:
        with PoolWatch(cluster) as workers:
            for command in commands:
                deadline = time.monotonic() + (900 if command.startswith("ray job") else 300)
                while True:
                    r = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True,
                                       timeout=max(10, deadline - time.monotonic()))
                    assert r.returncode == 0, f"{command}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
                    if not command.startswith("serve status"):  # "until meal-ray-teachers: RUNNING"
                        break
                    status = (yaml.safe_load(r.stdout) or {}).get("applications", {}).get(APP, {})
                    assert status.get("status") != "DEPLOY_FAILED", r.stdout
                    if status.get("status") == "RUNNING":
                        break
                    assert time.monotonic() < deadline, r.stdout
                    time.sleep(2)
                outputs[command.split()[0]] = r.stdout
        replicas = cluster.actor_pools(f"ServeReplica:{APP}:")
        assert sorted(replicas) == ["teachers"] * 3, replicas  # resnet18, resnet10t, ensemble
        assert workers.seen == {"students"}, workers.seen
    finally:
        serve.delete(APP)

    job = outputs["ray"]
    assert "done: top-1" in job and "[meal-ray] epoch 2/2 | loss" in job and "RayTrainWorker" not in job, job[-4000:]
    status = outputs["meal-ray"]
    for deployment in ("resnet18", "resnet10t", "ensemble"):
        assert re.search(rf"{deployment}: HEALTHY \[1 RUNNING\] \(1 on \S+ \[{POOL_LABEL}=teachers\]\)", status), status

    out = repo / "runs" / "quick-on-cluster"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["count"] == 2000
    assert all(h["teacher_latency_ms"] > 0 for h in metrics["history"])
    record = json.loads((out / "run.json").read_text())
    served = record["served_teacher_set"]
    assert [t["model"] for t in served["teachers"]] == ["resnet18", "resnet10t"]
    assert record["inputs"]["teachers.models.0.weights"] == served["teachers"][0]["weights"].split(":")[1]
    run = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}").get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params[f"run.label_selector.{POOL_LABEL}"] == "students"
    assert run.data.tags["meal_ray.teacher_set_fingerprint"] == served["fingerprint"]


def job(tmp_path, name, teachers, **run):
    return load_config(data=dict(
        name=name, mode="distill", data=dict(FMNIST_DATA, train_subset=512, val_subset=200),
        student=dict(model="test_efficientnet", num_classes=10),
        teachers=dict(source="local", models=[{"model": t["model"], "weights": t["weights"]} for t in teachers]),
        optim=dict(epochs=1, batch_size=64, lr=0.05),
        run=dict(dict(num_workers=2, cpus_per_worker=1, output=str(tmp_path / name), log_every=0,
                      tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), **run)))


def test_placements_no_node_can_hold_stop_before_anything_starts(cluster, tiny_teachers, tmp_path):
    """A label no node carries, more workers than the pool holds, a resource nobody offers, a Serve config for a pool
    that does not exist: each a PlacementError naming what is missing, before training or deploying (never a wait)."""
    from meal_ray.serve.lifecycle import teachers_up
    from meal_ray.train import run_job

    for name, run, says in (
            ("no-pool", dict(label_selector={POOL_LABEL: "gpu-students"}),
             [f"no node has the labels {POOL_LABEL}=gpu-students that each train worker asks for "
              "(run.label_selector)", f"{POOL_LABEL}=students; {POOL_LABEL}=teachers; no labels"]),
            ("too-many", dict(num_workers=8, label_selector={POOL_LABEL: "students"}),
             ["8 x train worker (CPU 1 each, on nodes with meal-ray.io/pool=students) do not fit: 4 fit",
              "on 1 such node(s)"]),
            ("no-resource", dict(resources_per_worker={"student_slot": 1}),
             ["each train worker needs student_slot 1", "none offers it"])):
        start = time.monotonic()
        with pytest.raises(PlacementError) as failure:
            run_job(job(tmp_path, name, tiny_teachers, **run), log=lambda s: None)
        for text in says:
            assert text in str(failure.value), str(failure.value)
        assert "ray start --address <head>" in str(failure.value)
        assert time.monotonic() - start < 60 and not (tmp_path / name).exists()  # refused, nothing written

    config = yaml.safe_load((ROOT / "deployments" / "fashion-mnist-pools.yaml").read_text())
    app = config["applications"][0]
    app["name"] = "meal-ray-unplaceable"
    app["args"]["teachers"] = [dict(t, name=n) for t, n in zip(tiny_teachers, ("resnet18", "resnet10t"))]
    for d in app["deployments"]:
        d["ray_actor_options"]["label_selector"] = {POOL_LABEL: "gpu-teachers"}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(PlacementError, match=r"replica of teacher deployment 'resnet18' asks for \(the Serve "
                                             r"config's deployments\[resnet18\]\.ray_actor_options\)"):
        teachers_up(path, log=lambda s: None)
    from meal_ray.serve.lifecycle import teachers_status

    assert "meal-ray-unplaceable" not in teachers_status()  # nothing deployed


def test_a_job_whose_pool_stays_busy_stops_after_the_placement_timeout(cluster, tiny_teachers, tmp_path):
    """The student pool exists but another job holds it: Ray Train waits run.placement_timeout_s for the workers,
    then the job stops with a PlacementError saying so (bounded, never a hang)."""
    import ray

    from meal_ray.train import run_job

    @ray.remote(num_cpus=4, label_selector={POOL_LABEL: "students"})
    class OtherJob:
        def ready(self):
            return True

    holder = OtherJob.remote()
    ray.get(holder.ready.remote())
    try:
        start = time.monotonic()
        with pytest.raises(PlacementError) as failure:
            run_job(job(tmp_path, "busy", tiny_teachers, label_selector={POOL_LABEL: "students"},
                        placement_timeout_s=5), log=lambda s: None)
        elapsed = time.monotonic() - start
    finally:
        ray.kill(holder)
    message = str(failure.value)
    assert "could not be placed within run.placement_timeout_s=5 s" in message and "stayed busy" in message, message
    assert elapsed < 120


def test_embedded_ray_starts_despite_a_stale_record_and_its_serve_opens_no_http_port(tmp_path):
    """A `ray start --block` stopped by a signal leaves /tmp/ray/ray_current_cluster behind; a bare ray.init() then
    tries to join that dead cluster and refuses num_cpus. Embedded Ray is started with address="local". The Serve
    that the demo starts there runs no HTTP proxy: nothing listens on Serve's port 8000."""
    import socket

    record = Path("/tmp/ray/ray_current_cluster")
    saved = record.read_text() if record.exists() else None
    record.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    record.write_text(f"127.0.0.1:{free}")
    code = ("import ray, socket\nfrom ray import serve\n"
            "from meal_ray.cluster import ensure_ray, start_serve_without_http\n"
            "ensure_ray(num_cpus=1, log_to_driver=False)\nprint('cpus', ray.cluster_resources()['CPU'])\n"
            "start_serve_without_http()\nprint('proxies', len(serve.status().proxies))\n"
            "print('port 8000', 'open' if socket.socket().connect_ex(('127.0.0.1', 8000)) == 0 else 'closed')\n"
            "serve.shutdown()\nray.shutdown()\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                             env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    finally:
        if saved is None:
            record.unlink(missing_ok=True)
        else:
            record.write_text(saved)
    assert out.returncode == 0 and "cpus 1.0" in out.stdout, out.stderr[-2000:]
    assert "proxies 0" in out.stdout and "port 8000 closed" in out.stdout, out.stdout
