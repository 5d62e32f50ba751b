"""Faults survived with nothing lost: each disturbed run ends with the weights of the undisturbed one, bit for bit.

Teachers are deterministic and the engine checkpoints every piece of state (model, optimizer, sampler epoch and
each rank's random streams), so "nothing lost" is an equality, not "it finished". Real Ray Train on a local cluster,
real Fashion-MNIST, in-process teachers (the served path's replica kill is in test_serving.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import yaml
from conftest import FMNIST_DATA

from meal_ray.config import load_config
from meal_ray.placement import POOL_LABEL

# The disturbed runs (real Ray Train/Serve, 1-2 min each on 2 cores, ~10 min in all) are `make test-faults`, kept out of
# `make test` to hold the suite's time; the checkpoint-format tests here run in both.
fault_run = pytest.mark.faults

EPOCHS = 2


def job(tmp_path: Path, name: str, teachers: list, **run):
    """A 2-worker local-teacher distillation with CutMix: every random stream (crops, mixes, shuffles) in play."""
    return load_config(data=dict(
        name=name, mode="distill",
        data=dict(FMNIST_DATA, train_subset=1024, val_subset=300),
        student=dict(model="test_efficientnet", num_classes=10),
        teachers=dict(source="local", models=[{"model": t["model"], "weights": t["weights"]} for t in teachers]),
        optim=dict(epochs=EPOCHS, batch_size=128, lr=0.05, cutmix=True),
        run=dict(dict(num_workers=2, cpus_per_worker=1, seed=3, output=str(tmp_path / name), checkpoints_to_keep=3,
                      tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", log_every=0), **run)))


def final_state(out: Path) -> dict:
    from meal_ray.train.worker import load_state

    return load_state(newest_checkpoint(out))


def checkpoints(out: Path) -> list:
    return sorted(p for p in (out / "ray" / "train").glob("checkpoint_*") if p.is_dir())


def newest_checkpoint(out: Path) -> Path:
    return checkpoints(out)[-1]


def assert_same_weights(state: dict, reference: dict) -> None:
    for part in ("student", "discriminator"):
        assert state[part].keys() == reference[part].keys()
        for k, v in reference[part].items():
            assert torch.equal(state[part][k], v), f"{part}.{k} differs from the undisturbed run"


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, ray_cluster, tiny_teachers):
    """The reference: the same job, never disturbed. Returns (final state, output directory)."""
    from meal_ray.train import run_job

    root = tmp_path_factory.mktemp("undisturbed")
    result = run_job(job(root, "undisturbed", tiny_teachers), log=lambda s: None)
    assert [h["epoch"] for h in result["history"]] == list(range(1, EPOCHS + 1))
    out = root / "undisturbed"
    return final_state(out), out


def test_checkpoints_hold_plain_tensors_only_and_pickled_payloads_are_refused(tmp_path):
    """A checkpoint loads with weights_only=True; one carrying a pickled object is refused, not executed."""
    from conftest import make_config

    from meal_ray.engine import Engine
    from meal_ray.train.worker import load_state, save_state

    engine = Engine.for_job(make_config("pretrain", "test_efficientnet", 1, 0.05, 256), log=lambda s: None)
    save_state(engine.state_dict(), tmp_path)
    state = load_state(tmp_path)
    twin = Engine.for_job(make_config("pretrain", "test_efficientnet", 1, 0.05, 256), log=lambda s: None)
    torch.manual_seed(12345)  # a different stream, which load_state_dict must put back
    twin.load_state_dict(state)
    assert torch.equal(torch.get_rng_state(), state["rng_per_rank"][0]["torch"])
    (tmp_path / "evil").mkdir()
    torch.save({"epoch": 1, "payload": _Payload()}, tmp_path / "evil" / "state.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_state(tmp_path / "evil")


def test_no_readable_checkpoint_is_a_clear_error_naming_the_fix(tmp_path):
    from meal_ray.errors import CheckpointError
    from meal_ray.train.worker import resume_state

    for name in ("checkpoint_1", "checkpoint_2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_bytes(b"PK\x03\x04cut short")
    said = []
    with pytest.raises(CheckpointError, match="--overwrite"):
        resume_state(tmp_path / "checkpoint_2", log=said.append)
    assert [s.split()[1] for s in said] == ["checkpoint_2", "checkpoint_1"]  # newest first, each one named


class _Payload:
    """Stands for any pickled object in a checkpoint (it could run code when unpickled without weights_only)."""


@contextlib.contextmanager
def mid_epoch_2(out: Path, action: Callable[[], bool], delay_s: float = 1.0, registered: bool = True):
    """Run ``action`` in a thread ``delay_s`` into epoch 2 (once Ray Train registered epoch 1's checkpoint; with
    ``registered=False`` as soon as its directory appears, while the workers are still reporting it), again until it
    returns True; yields a list that gets the time it succeeded."""
    stop, done = threading.Event(), []
    snapshot = out / "ray" / "train" / "checkpoint_manager_snapshot.json"

    def watch():
        while not stop.is_set() and not done:
            if checkpoints(out) and (snapshot.is_file() or not registered):
                time.sleep(delay_s)
                if not stop.is_set() and action():
                    done.append(time.monotonic())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield done
    finally:
        stop.set()
        watcher.join()


def kill(title: bytes = b"", pid: Optional[int] = None) -> Callable[[], bool]:
    """An action that SIGKILLs ``pid``, or the first of our cluster's processes whose title starts with ``title``."""
    def action() -> bool:
        targets = [pid] if pid else processes(title)
        for target in targets[:1]:
            os.kill(target, signal.SIGKILL)
        return bool(targets)

    return action


def processes(title: bytes) -> list:
    """Our cluster's processes whose title starts with ``title``."""
    return [int(c.parent.name) for c in Path("/proc").glob("[0-9]*/cmdline")
            if _title(c).startswith(title) and _ours(int(c.parent.name))]


def _title(cmdline: Path) -> bytes:
    try:
        return cmdline.read_bytes()
    except OSError:
        return b""


def _ours(pid: int) -> bool:
    """A process of this session's cluster (its raylet is our child), not another cluster's."""
    while pid > 1:
        if pid == os.getpid():
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


@fault_run
def test_killed_train_worker_ends_with_the_undisturbed_weights(tmp_path, undisturbed, tiny_teachers):
    """Item 2: a worker SIGKILLed mid-epoch 2; Ray Train restarts the group from epoch 1's checkpoint."""
    from meal_ray.train import run_job

    reference, _ = undisturbed
    cfg = job(tmp_path, "worker-killed", tiny_teachers)
    with mid_epoch_2(cfg.output_dir, kill(b"ray::RayTrainWorker")) as killed:
        result = run_job(cfg, log=lambda s: None)
    assert killed, "no train worker was found to kill"
    restarted = [h for h in result["history"] if h["start_epoch"] > 0]
    assert restarted, "the run was not restarted from a checkpoint"
    assert [h["epoch"] for h in result["history"]] == list(range(1, EPOCHS + 1))  # no epoch skipped or counted twice
    assert_same_weights(final_state(cfg.output_dir), reference)


@fault_run
def test_killed_driver_then_resume_ends_with_the_undisturbed_weights(tmp_path, undisturbed, tiny_teachers,
                                                                      ray_cluster):
    """Item 3: the job's driver (`meal-ray distill` on the cluster) SIGKILLed mid-epoch 2, then the same command
    with --resume."""
    cfg = job(tmp_path, "driver-killed", tiny_teachers)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    command = [str(Path(sys.executable).parent / "meal-ray"), "distill", "--config", str(config),
               "--address", ray_cluster.get_runtime_context().gcs_address]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with mid_epoch_2(cfg.output_dir, kill(pid=driver.pid)) as killed:
        driver.wait(timeout=600)
    assert killed and driver.returncode == -signal.SIGKILL, "the driver finished before it could be killed"
    # Ray Train's detached placement-group cleaner of the killed run asks the State API (the dashboard, which this
    # test cluster does not run) whether the controller died, and would log that it cannot, forever: stop it.
    for pid in processes(b"ray::PlacementGroupCleaner"):
        os.kill(pid, signal.SIGKILL)
    assert not (cfg.output_dir / "metrics.json").exists()
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # what the user sees: rank 0's lines through the driver's progress view, none of Ray's actor output
    assert "[meal-ray] resumed from checkpoint at epoch 1" in resumed.stdout
    assert f"[meal-ray] epoch {EPOCHS}/{EPOCHS} | loss" in resumed.stdout
    assert "RayTrainWorker" not in resumed.stdout + resumed.stderr, resumed.stdout + resumed.stderr
    metrics = json.loads((cfg.output_dir / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, EPOCHS + 1))
    assert_same_weights(final_state(cfg.output_dir), undisturbed[0])


@fault_run
def test_demo_stage_stopped_midway_resumes_its_checkpoint_and_ends_with_the_undisturbed_weights(
        tmp_path, undisturbed, tiny_teachers, ray_cluster):
    """A demo stopped mid-stage (the process running the stage SIGKILLed mid-epoch 2): the next demo resumes that
    stage from epoch 1's checkpoint instead of training it again, plans and counts only the epochs left for its ETA,
    continues its MLflow run under the new demo's run, and ends with the undisturbed weights."""
    from mlflow import MlflowClient

    from meal_ray.demo.stages import DemoClock, _planned_stage_work, run_stage
    from meal_ray.tracking import PARENT_RUN_TAG

    cfg = job(tmp_path, "stage-stopped", tiny_teachers)
    config = tmp_path / "stage.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    code = ("import sys; from meal_ray.config import load_config; from meal_ray.demo.stages import run_stage; "
            "run_stage(load_config(sys.argv[1]), print)")
    demo = subprocess.Popen([sys.executable, "-c", code, str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env=dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address))
    with mid_epoch_2(cfg.output_dir, kill(pid=demo.pid)) as killed:
        demo.wait(timeout=600)
    assert killed and demo.returncode == -signal.SIGKILL, "the stage finished before it could be stopped"
    for pid in processes(b"ray::PlacementGroupCleaner"):  # as in the killed-driver test
        os.kill(pid, signal.SIGKILL)
    stopped_run = json.loads((cfg.output_dir / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(cfg.run.tracking_uri)
    next_demo = client.create_run(client.get_experiment_by_name(cfg.run.experiment).experiment_id,
                                  run_name="demo").info.run_id
    said = []
    images = cfg.data.train_subset
    clock = DemoClock([(cfg.student.model, _planned_stage_work(cfg)[1])])
    assert clock.stages == [(cfg.student.model, (EPOCHS - 1) * images)]  # the demo's ETA: only the epochs left
    result = run_stage(cfg, said.append, parent_run_id=next_demo, clock=clock)
    assert clock.done_work == {cfg.student.model: (EPOCHS - 1) * images}  # the pace: the epochs this run trained
    assert any(line.endswith("(resuming its last checkpoint)") for line in said), said
    assert any(line.startswith("[meal-ray] resumed from checkpoint at epoch 1") for line in said), said
    assert [h["epoch"] for h in result["history"]] == list(range(1, EPOCHS + 1))
    assert_same_weights(final_state(cfg.output_dir), undisturbed[0])
    assert result["mlflow_run_id"] == stopped_run
    assert client.get_run(stopped_run).data.tags[PARENT_RUN_TAG] == next_demo


@fault_run
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(undisturbed, tiny_teachers):
    """Item 5: the newest checkpoint cut short on disk; --resume says so, continues from the one before and still
    ends with the undisturbed weights. (Runs last on the reference's directory: it retrains epoch 3 there.)"""
    from meal_ray.train import run_job

    reference, out = undisturbed
    newest = newest_checkpoint(out)
    data = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(data[: len(data) // 2])
    cfg = job(out.parent, "undisturbed", tiny_teachers)
    result = run_job(cfg, resume=True, log=lambda s: None)
    resumed = [h for h in result["history"] if h.get("resume_skipped_checkpoints")]
    assert resumed and resumed[0]["start_epoch"] == EPOCHS - 1 and resumed[0]["resume_skipped_checkpoints"] == 1
    assert [h["epoch"] for h in result["history"]] == list(range(1, EPOCHS + 1))
    assert_same_weights(final_state(out), reference)


# --------------------------------------------------------------------------- served teachers
APP = "meal-ray-faults-teachers"


def served_job(tmp_path: Path, name: str, teachers: list, **over):
    cfg = job(tmp_path, name, teachers)
    cfg.teachers.source, cfg.teachers.app_name = "served", APP
    for k, v in over.items():
        setattr(cfg.teachers, k, v)
    cfg.validate()
    return cfg


def deploy_teachers(teachers: list) -> None:
    from ray import serve

    from meal_ray.serve.app import build_app

    serve.run(build_app({"teachers": teachers, "max_batch_size": 256, "batch_wait_timeout_s": 0.005}), name=APP,
              route_prefix=None)


@pytest.fixture(scope="module")
def served_undisturbed(tmp_path_factory, ray_cluster, tiny_teachers):
    """Teachers served (teacher0, teacher1) and the reference served run's final state."""
    from ray import serve

    from meal_ray.train import run_job

    deploy_teachers(tiny_teachers)
    root = tmp_path_factory.mktemp("served")
    run_job(served_job(root, "undisturbed", tiny_teachers), log=lambda s: None)
    yield final_state(root / "undisturbed")
    serve.delete(APP)


SLOW_APP = "meal-ray-faults-busy-teachers"


def busy_job(tmp_path: Path, name: str, teachers: list, **over):
    """served_job on the busy teachers, with epochs long enough (4096 images, ~6 s) that a kill 1 s into epoch 2
    lands while it trains."""
    cfg = served_job(tmp_path, name, teachers, app_name=SLOW_APP, **over)
    cfg.data.train_subset = 4096
    return cfg.validate()


@pytest.fixture(scope="module")
def busy_undisturbed(tmp_path_factory, ray_cluster, tiny_teachers):
    """Teachers that are always computing when a request is in flight (emulated: each forward pass takes 100 ms and
    more, deterministic logits), so a replica killed mid-run dies with requests executing (Serve itself re-sends
    requests a dead replica had not started); the reference run's final state."""
    from ray import serve

    from meal_ray.serve.app import build_app
    from meal_ray.train import run_job

    serve.run(build_app({"teachers": tiny_teachers, "max_batch_size": 256, "batch_wait_timeout_s": 0.005,
                         "emulate": {"crops_per_s": 8000, "overhead_ms": 100}}), name=SLOW_APP, route_prefix=None)
    root = tmp_path_factory.mktemp("busy")
    run_job(busy_job(root, "undisturbed", tiny_teachers), log=lambda s: None)
    yield final_state(root / "undisturbed")
    serve.delete(SLOW_APP)


@fault_run
@pytest.mark.parametrize("client,replica", [("ingress", "teacher0"), ("direct", "teacher0"), ("ingress", "ensemble")])
def test_replica_killed_with_requests_executing_is_asked_again_and_the_run_ends_with_the_undisturbed_weights(
        tmp_path, busy_undisturbed, tiny_teachers, client, replica):
    """A replica SIGKILLed mid-epoch 2 of a served run while it computes: a teacher's (the ingress asks it again;
    with `teachers.client: direct` the train worker's client does) or the ingress itself (the train worker's client
    asks the new one). Serve replaces it; no step is skipped or repeated."""
    from meal_ray.train import run_job

    cfg = busy_job(tmp_path, f"{replica}-killed-{client}", tiny_teachers, client=client)
    with mid_epoch_2(cfg.output_dir, kill(f"ray::ServeReplica:{SLOW_APP}:{replica}".encode())) as killed:
        result = run_job(cfg, log=lambda s: None)
    assert killed, f"no {replica} replica was found to kill"
    assert all(h["start_epoch"] == 0 for h in result["history"])  # the run itself never restarted
    retried = sum(h["teacher_retries"] for h in result["history"])
    # who asked again: the train worker's client, or (a teacher lost behind the ingress) the ingress alone
    assert retried > 0 if (client, replica) != ("ingress", "teacher0") else retried == 0, result["history"]
    assert_same_weights(final_state(cfg.output_dir), busy_undisturbed)


@fault_run
def test_teachers_gone_past_the_timeout_stop_the_job_resumably(tmp_path, served_undisturbed, tiny_teachers):
    """Item 4: the teacher application deleted mid-epoch 2 and gone for longer than teachers.timeout_s: the job
    stops with the teachers' own message and its checkpoint; it never hangs. Teachers back, --resume ends with the
    undisturbed weights."""
    from ray import serve

    from meal_ray.errors import TeachersNotRunningError
    from meal_ray.train import run_job

    def delete_teachers_while_workers_wait() -> bool:
        """Epoch 2 takes ~2 s, less than Serve needs to drain and delete an app: hold the workers (SIGSTOP) at
        epoch 1's checkpoint until the app is gone, so epoch 2 always meets no teachers."""
        workers = processes(b"ray::RayTrainWorker")
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            serve.delete(APP)
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        return True

    cfg = served_job(tmp_path, "teachers-gone", tiny_teachers, timeout_s=10.0)
    try:
        with mid_epoch_2(cfg.output_dir, delete_teachers_while_workers_wait, delay_s=0, registered=False) as gone:
            with pytest.raises(TeachersNotRunningError) as failure:
                run_job(cfg, log=lambda s: None)
    finally:
        deploy_teachers(tiny_teachers)
    assert gone, "the job ended before the teachers could be removed"
    assert time.monotonic() - gone[0] < 300  # bounded: the timeout, a restart attempt, no hang
    message = str(failure.value)
    assert "meal-ray teachers up" in message and "--resume" in message and "Traceback" not in message
    assert not (cfg.output_dir / "metrics.json").exists() and checkpoints(cfg.output_dir)
    run_job(cfg, resume=True, log=lambda s: None)
    assert_same_weights(final_state(cfg.output_dir), served_undisturbed)


@fault_run
def test_two_jobs_sharing_one_teacher_pool_each_end_as_their_solo_run(tmp_path, served_undisturbed, tiny_teachers,
                                                                      ray_cluster):
    """Item 7: two distillation jobs (two `meal-ray distill` drivers) on one served teacher pool at once; the replicas
    batch both jobs' requests together, and each job ends with the weights of the same job run alone."""
    commands = []
    for name in ("shared-a", "shared-b"):
        cfg = served_job(tmp_path, name, tiny_teachers)
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(cfg.to_dict()))
        commands.append((cfg.output_dir, [str(Path(sys.executable).parent / "meal-ray"), "distill", "--config",
                                          str(config), "--address", ray_cluster.get_runtime_context().gcs_address]))
    drivers = [(out, subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
               for out, c in commands]
    for out, driver in drivers:
        _, err = driver.communicate(timeout=900)
        assert driver.returncode == 0, err[-3000:]
    for out, _ in drivers:
        assert_same_weights(final_state(out), served_undisturbed)


# --------------------------------------------------------------------------- the cluster's pools
# The session's cluster (conftest.SessionCluster): a head, two teacher nodes, a student node. Each test leaves it
# with that shape (a lost node is replaced by a new one of its pool).
POOL_APP = "meal-ray-pool-teachers"
TEACHERS, STUDENTS = {POOL_LABEL: "teachers"}, {POOL_LABEL: "students"}


def pool_serve_config(teachers: list, replicas: int = 1, autoscaling: Optional[dict] = None) -> dict:
    """The tiny teachers placed as deployments/fashion-mnist-pools.yaml places its own: every replica (and the
    ingress) on a teacher node, a replica leaving drains its batches first. ``autoscaling`` gives the teachers an
    ``autoscaling_config`` instead of ``num_replicas`` (``min_replicas == max_replicas`` for a fixed count)."""
    deployments = []
    for name in ("teacher0", "teacher1"):
        d = {"name": name, "max_ongoing_requests": 16, "graceful_shutdown_timeout_s": 20,
             "ray_actor_options": {"num_cpus": 1, "label_selector": TEACHERS}}
        d.update({"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas})
        deployments.append(d)
    deployments.append({"name": "ensemble", "num_replicas": 1, "max_ongoing_requests": 64,
                        "ray_actor_options": {"num_cpus": 0, "label_selector": TEACHERS}})
    return {"proxy_location": "Disabled", "applications": [{
        "name": POOL_APP, "import_path": "meal_ray.serve.app:build_app", "route_prefix": None,
        "args": {"teachers": [dict(t, name=n) for t, n in zip(teachers, ("teacher0", "teacher1"))],
                 "max_batch_size": 256, "batch_wait_timeout_s": 0.005},
        "deployments": deployments}]}


def serve_deploy(cluster, config: dict, path: Path) -> None:
    """`serve deploy` (Ray's CLI), as an operator changes the teacher pool while jobs run."""
    path.write_text(yaml.safe_dump(config))
    r = subprocess.run([str(Path(sys.executable).parent / "serve"), "deploy", str(path)], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, RAY_DASHBOARD_ADDRESS=cluster.dashboard))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def replica_ids(deployment: str, running: bool = True) -> set:
    """The ids of the pool app's RUNNING replicas of ``deployment`` (``running=False``: in any state)."""
    from meal_ray.cluster import serve_details

    app = serve_details().get("applications", {}).get(POOL_APP) or {}
    d = (app.get("deployments") or {}).get(deployment) or {}  # none while the app is being built
    return {r["replica_id"] for r in d.get("replicas") or []
            if not running or str(r.get("state")).endswith("RUNNING")}


def replica_pools(cluster, deployment: Optional[str] = None) -> list:
    """The pool of the node of every RUNNING replica of the pool app (or of one of its deployments)."""
    from meal_ray.cluster import serve_details

    pools = cluster.pool_of()
    app = serve_details().get("applications", {}).get(POOL_APP) or {}
    return [pools.get(r.get("node_id"), "gone") for name, d in (app.get("deployments") or {}).items()
            if deployment in (None, name) for r in d.get("replicas") or [] if str(r.get("state")).endswith("RUNNING")]


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def pool_job(tmp_path: Path, name: str, teachers: list, **over):
    cfg = served_job(tmp_path, name, teachers)
    cfg.teachers.app_name, cfg.run.label_selector = POOL_APP, dict(STUDENTS)
    for k, v in over.items():
        setattr(cfg.optim if k in ("epochs",) else cfg.data if k == "train_subset" else cfg.run, k, v)
    return cfg.validate()


@pytest.fixture
def pool_teachers(cluster, tiny_teachers, tmp_path):
    """The pool app deployed with `serve deploy` (one replica per teacher), deleted after the test."""
    from ray import serve

    serve_deploy(cluster, pool_serve_config(tiny_teachers), tmp_path / "serve.yaml")
    wait_for(lambda: sorted(replica_pools(cluster)) == ["teachers"] * 3, "the pool app's 3 replicas")
    yield tmp_path / "serve.yaml"
    serve.delete(POOL_APP)


def node_holding_most_replicas(cluster):
    from meal_ray.cluster import serve_details

    counts = {}
    for d in serve_details()["applications"][POOL_APP]["deployments"].values():
        for r in d["replicas"]:
            counts[r["node_id"]] = counts.get(r["node_id"], 0) + 1
    return max(cluster.nodes["teachers"], key=lambda n: counts.get(n.node_id, 0))


@fault_run
def test_teacher_node_lost_mid_run_its_replicas_return_on_the_other_teacher_node(tmp_path, served_undisturbed,
                                                                                 tiny_teachers, cluster, pool_teachers):
    """The teacher node holding most of the app's replicas is lost mid-epoch 2 (every process on it killed): Serve
    starts its replicas again on the other teacher node, the lost requests are asked again, and the job (its workers
    on the student node) ends with the undisturbed weights, never restarting."""
    from meal_ray.cluster import serve_details
    from meal_ray.train import run_job

    cfg = pool_job(tmp_path, "teacher-node-lost", tiny_teachers)
    node = node_holding_most_replicas(cluster)
    on_node = {r["replica_id"] for d in serve_details()["applications"][POOL_APP]["deployments"].values()
               for r in d["replicas"] if r["node_id"] == node.node_id}
    try:
        with mid_epoch_2(cfg.output_dir, lambda: cluster.remove_node(node) or True) as lost:
            result = run_job(cfg, log=lambda s: None)
    finally:
        cluster.add_node("teachers")  # the pool's shape for the tests after this one
    assert lost, "the job ended before the node could be removed"
    assert all(h["start_epoch"] == 0 for h in result["history"])
    assert_same_weights(final_state(cfg.output_dir), served_undisturbed)
    # Ray marks the node dead, Serve's replacements of its replicas run on the teacher pool
    wait_for(lambda: node.node_id not in cluster.pool_of(), "the lost node to be marked dead")
    # the job may end before Serve has replaced every lost replica (the others answered the asked-again requests)
    wait_for(lambda: sorted(replica_pools(cluster)) == ["teachers"] * 3, "the lost replicas to be replaced")
    now = {r["replica_id"] for d in serve_details()["applications"][POOL_APP]["deployments"].values()
           for r in d["replicas"]}
    assert on_node and not on_node & now


def distill_in_background(cfg, tmp_path: Path, cluster, *extra: str) -> subprocess.Popen:
    """`meal-ray distill` of ``cfg`` as its own driver on the session's cluster (this process stays free to add and
    remove nodes: Ray starts a node only from a main thread); stdout and stderr in <output>.log."""
    path = tmp_path / f"{cfg.name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    log = open(tmp_path / f"{cfg.name}.log", "a")
    return subprocess.Popen([str(Path(sys.executable).parent / "meal-ray"), "distill", "--config", str(path),
                             "--address", cluster.address, *extra], stdout=log, stderr=subprocess.STDOUT, text=True)


def finished(driver: subprocess.Popen, tmp_path: Path, name: str, timeout_s: float = 900) -> str:
    """Wait for a background driver; its output."""
    driver.wait(timeout=timeout_s)
    return (tmp_path / f"{name}.log").read_text()


def when_mid_epoch_2(out: Path, driver: subprocess.Popen, delay_s: float = 1.0, timeout_s: float = 600) -> float:
    """Block until ``delay_s`` into epoch 2 of the run in ``out`` (Ray Train registered epoch 1's checkpoint), as
    mid_epoch_2 does from a thread; returns the time."""
    snapshot = out / "ray" / "train" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while not (checkpoints(out) and snapshot.is_file()):
        assert driver.poll() is None, "the job ended before epoch 2"
        assert time.monotonic() < deadline, "no epoch-1 checkpoint"
        time.sleep(0.01)
    time.sleep(delay_s)
    return time.monotonic()


@fault_run
def test_student_node_lost_mid_run_restarts_the_workers_on_a_new_student_node(tmp_path, undisturbed, tiny_teachers,
                                                                              cluster):
    """The student node lost mid-epoch 2 (its workers with it) and a new one joining: Ray Train restarts the group
    there from epoch 1's checkpoint and the run ends with the undisturbed weights."""
    cfg = job(tmp_path, "student-node-lost", tiny_teachers, label_selector=STUDENTS)
    driver = distill_in_background(cfg, tmp_path, cluster)
    when_mid_epoch_2(cfg.output_dir, driver)
    cluster.remove_node(cluster.nodes["students"][0])
    cluster.add_node("students")
    output = finished(driver, tmp_path, cfg.name)
    assert driver.returncode == 0, output[-3000:]
    history = json.loads((cfg.output_dir / "metrics.json").read_text())["history"]
    assert [h for h in history if h["start_epoch"] > 0], "the run was not restarted from a checkpoint"
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert_same_weights(final_state(cfg.output_dir), undisturbed[0])


@fault_run
def test_no_node_left_for_the_students_stops_the_job_within_the_placement_timeout_resumably(
        tmp_path, undisturbed, tiny_teachers, cluster):
    """The only student node lost mid-epoch 2 and none coming: the job stops run.placement_timeout_s after Ray
    Train's restart began waiting, with a PlacementError naming the missing pool and its checkpoints kept; a new
    student node, then --resume, ends with the undisturbed weights."""
    cfg = job(tmp_path, "students-gone", tiny_teachers, label_selector=STUDENTS, placement_timeout_s=15)
    driver = distill_in_background(cfg, tmp_path, cluster)
    when_mid_epoch_2(cfg.output_dir, driver)
    try:
        cluster.remove_node(cluster.nodes["students"][0])
        lost = time.monotonic()
        output = finished(driver, tmp_path, cfg.name)
        stopped_after_s = time.monotonic() - lost
    finally:
        cluster.add_node("students")
    assert driver.returncode == 1, output[-3000:]
    assert "PlacementError: the 2 train worker(s) could not be placed within run.placement_timeout_s=15 s" in output
    assert f"no node has the labels {POOL_LABEL}=students" in output and "--resume" in output, output[-3000:]
    assert "Traceback" not in output and stopped_after_s < 180  # bounded: the restart's wait for a node, then this
    assert checkpoints(cfg.output_dir) and not (cfg.output_dir / "metrics.json").exists()
    resumed = distill_in_background(cfg, tmp_path, cluster, "--resume")
    output = finished(resumed, tmp_path, cfg.name)
    assert resumed.returncode == 0, output[-3000:]
    assert_same_weights(final_state(cfg.output_dir), undisturbed[0])


@fault_run
def test_teacher_pool_rescaled_and_autoscaled_while_jobs_run_changes_no_result(tmp_path, tiny_teachers, cluster,
                                                                              pool_teachers):
    """While a served job trains on the student node: `serve deploy` of the same app with 2 replicas per teacher,
    then 1 again (the leaving replicas drain their batches), then with autoscaling bounds as a second job arrives,
    so Serve adds replicas on the teacher nodes. Neither job stops or loses a request, no replica that stays is
    restarted, and both jobs end with the weights of the same job run alone.

    The teachers are in the autoscaling form throughout (``min_replicas == max_replicas`` for a fixed count), as
    docs/cluster.md advises: Ray 2.60 counts a deployment's autoscaling policy in the application's code version,
    so switching from ``num_replicas`` to ``autoscaling_config`` rebuilds the app and replaces every replica, the
    ingress included (a request in flight then can be lost with its replica and is asked again; the weights are
    still the same, as test_replica_killed_with_requests_executing... shows). Within one form each deploy is a
    lightweight update."""
    from meal_ray.train import run_job

    long = dict(epochs=6, train_subset=4096)
    reference = pool_job(tmp_path, "alone", tiny_teachers, **long)
    run_job(reference, log=lambda s: None)

    def fixed(n):
        return {"min_replicas": n, "max_replicas": n}

    def start(name):
        cfg = pool_job(tmp_path, name, tiny_teachers, **long)
        return cfg, distill_in_background(cfg, tmp_path, cluster)

    def teachers_at(n, what, new_since: Optional[dict] = None):
        """Wait for n RUNNING replicas per teacher (one ingress), none starting or stopping, and (``new_since``)
        none of the replicas that were running before."""
        old = new_since or {}
        wait_for(lambda: all(len(replica_ids(d)) == len(replica_ids(d, running=False)) == k
                             and not replica_ids(d) & old.get(d, set())
                             for d, k in (("teacher0", n), ("teacher1", n), ("ensemble", 1))), what)

    before = {d: replica_ids(d) for d in ("teacher0", "teacher1", "ensemble")}
    serve_deploy(cluster, pool_serve_config(tiny_teachers, autoscaling=fixed(1)), pool_teachers)  # the form to scale
    teachers_at(1, "every replica replaced by the switch to the autoscaling form", new_since=before)
    kept = {d: replica_ids(d) for d in ("teacher0", "teacher1", "ensemble")}
    first, first_driver = start("rescaled")
    wait_for(lambda: (first.output_dir / "progress.json").is_file(), "the first job to train")
    serve_deploy(cluster, pool_serve_config(tiny_teachers, autoscaling=fixed(2)), pool_teachers)
    teachers_at(2, "2 replicas per teacher")
    assert all(kept[d] <= replica_ids(d) for d in kept), kept  # added beside the running ones, none replaced
    serve_deploy(cluster, pool_serve_config(tiny_teachers, autoscaling=fixed(1)), pool_teachers)
    teachers_at(1, "1 replica per teacher again")
    autoscaling = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
                   "downscale_delay_s": 600, "metrics_interval_s": 0.5, "look_back_period_s": 2}
    serve_deploy(cluster, pool_serve_config(tiny_teachers, autoscaling=autoscaling), pool_teachers)
    second, second_driver = start("arrived")
    grown = []
    wait_for(lambda: grown.append(replica_pools(cluster)) or len(grown[-1]) > 3, "autoscaling to add replicas")
    assert replica_ids("ensemble") == kept["ensemble"]  # every deploy was a lightweight update: no app rebuild
    for cfg, driver in ((first, first_driver), (second, second_driver)):
        output = finished(driver, tmp_path, cfg.name)
        assert driver.returncode == 0, output[-3000:]
    assert set(grown[-1]) == {"teachers"}, grown[-1]  # the added replicas run on the teacher nodes
    reference_state = final_state(reference.output_dir)
    for cfg in (first, second):
        history = json.loads((cfg.output_dir / "metrics.json").read_text())["history"]
        assert all(h["start_epoch"] == 0 for h in history)  # never stopped
        assert sum(h["teacher_retries"] for h in history) == 0  # no request lost: leaving replicas drained theirs
        assert_same_weights(final_state(cfg.output_dir), reference_state)


# --------------------------------------------------------------------------- another Ray beside a run
STATE_PROBE = '''
import json, socket, sys
import ray
from ray.cluster_utils import Cluster
from meal_ray.cluster import ensure_ray

if sys.argv[1] == "meal-ray":
    ensure_ray(num_cpus=1)  # meal-ray's embedded local Ray
else:
    ray.init(address="local", num_cpus=1)  # the same without meal-ray's care


@ray.remote(num_cpus=0)
def ask_state_api_about(actor_id):  # what Ray Train's placement-group cleaner does, from a process of this run
    from ray.util.state import get_actor
    return get_actor(actor_id, timeout=30) is not None


@ray.remote(num_cpus=0)
class Controller:
    def actor_id(self):
        return ray.get_runtime_context().get_actor_id()


controller = Controller.remote()
actor_id = ray.get(controller.actor_id.remote())
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
other = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=True, dashboard_port=port))
try:  # another Ray started on this machine after this run's: Ray's record of "the latest cluster" names it
    print(json.dumps({"found": ray.get(ask_state_api_about.remote(actor_id))}))
finally:
    other.shutdown()
'''


@fault_run
def test_another_ray_started_beside_an_embedded_run_leaves_its_state_api_on_its_own_cluster(tmp_path):
    """Ray's state API, asked with no address (as Ray Train's placement-group cleaner asks whether its run's
    controller is alive), answers from the Ray cluster started last on the machine. With plain Ray the run's own
    controller is then "not found" and the cleaner removes the run's workers (seen on this VM: a demo stage lost its
    worker group when a test cluster started). meal-ray's embedded Ray names its own dashboard to its processes."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    found = {}
    for how in ("plain", "meal-ray"):
        r = subprocess.run([sys.executable, "-c", STATE_PROBE, how], capture_output=True, text=True, timeout=300,
                           env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        found[how] = json.loads(r.stdout.strip().splitlines()[-1])["found"]
    assert found == {"plain": False, "meal-ray": True}  # plain Ray asks the other cluster; meal-ray's run its own
