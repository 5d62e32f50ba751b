"""The cluster path end to end: `ray start --head`, `serve deploy` of the teachers, `ray job submit` of a job.

A second, separate Ray cluster is started with `ray start --head --block` (stopped with
SIGTERM: `ray stop` would stop every Ray cluster on the machine, the test session's included).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = os.path.dirname(sys.executable)
APP = "meal-ray-teachers"  # teachers.app_name of jobs/fashion-mnist-quick.yaml


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head` in its own directory (relative weights paths in Serve configs resolve there)."""
    cwd = tmp_path_factory.mktemp("head")
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env_agent = _free_ports(7)
    temp = Path(f"/tmp/mrc{os.getpid()}")  # short: Ray's socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", PATH=f"{BIN}:{env.get('PATH', '')}")  # jobs find `meal-ray` on the PATH
    if (Path.home() / ".ray" / "auth_token").is_file():  # `ray start` then enables token auth; the Ray CLIs
        env.setdefault("RAY_AUTH_MODE", "token")  # send the token to an explicit address only when told
    proc = subprocess.Popen(
        [f"{BIN}/ray", "start", "--head", "--block", "--num-cpus", "4", f"--port={gcs}",
         f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env_agent}",
         f"--temp-dir={temp}", "--include-dashboard=true", "--disable-usage-stats"],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield dict(address=f"http://127.0.0.1:{dash}", env=env, cwd=cwd, proc=proc)
    finally:
        proc.terminate()  # drains for up to 30 s, then stops its processes
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _cli(head, *args, timeout=120):
    return subprocess.run([f"{BIN}/{args[0]}", *args[1:]], env=head["env"], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def deployed(head, tiny_teachers):
    """deployments/fashion-mnist.yaml with the tiny teachers' weights, via `serve deploy`, polled to RUNNING."""
    config = yaml.safe_load((ROOT / "deployments" / "fashion-mnist.yaml").read_text())
    app = config["applications"][0]
    assert app["name"] == APP
    for i, (t, entry) in enumerate(zip(tiny_teachers, app["args"]["teachers"])):
        shutil.copytree(t["weights"], head["cwd"] / "runs" / f"t{i}" / "student")
        entry.update(model=t["model"], weights=f"runs/t{i}/student")  # relative, as in the repo's file
    for d in app["deployments"]:
        if d["name"] != "ensemble":
            d["ray_actor_options"] = {"num_cpus": 0.5}
    path = head["cwd"] / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    deadline = time.monotonic() + 300
    deployed, out, status = False, "", {}
    while time.monotonic() < deadline:
        assert head["proc"].poll() is None, head["proc"].stdout.read()
        if not deployed:
            deployed = _cli(head, "serve", "deploy", str(path), "--address", head["address"]).returncode == 0
        else:
            out = _cli(head, "serve", "status", "--address", head["address"]).stdout
            status = (yaml.safe_load(out) or {}).get("applications", {}).get(APP, {})
            assert status.get("status") != "DEPLOY_FAILED", out
            if status.get("status") == "RUNNING":
                break
        time.sleep(2)
    assert "status: RUNNING" in out, out
    assert all(d["status"] == "HEALTHY" for d in status["deployments"].values())
    assert not yaml.safe_load(out).get("proxies"), out  # the repo's config runs no HTTP proxy
    return status


def served_teachers(head) -> list:
    """The deployed teachers as a job's teachers.models (absolute paths: the job runs in a copy of the repo)."""
    app = yaml.safe_load((head["cwd"] / "serve.yaml").read_text())["applications"][0]
    return [{"model": t["model"], "weights": str(head["cwd"] / t["weights"])} for t in app["args"]["teachers"]]


def test_ray_job_submit_runs_the_quick_job_to_succeeded(head, deployed, tmp_path):
    """The README's cluster commands: the job runs the uploaded code (`python -m meal_ray.cli`), its driver
    joins the cluster (RAY_ADDRESS, token auth), its 2 workers get soft labels from the served teachers."""
    from mlflow.tracking import MlflowClient

    out, db = tmp_path / "quick", tmp_path / "mlflow.db"
    sid = f"meal-ray-test-{os.getpid()}"
    r = _cli(head, "ray", "job", "submit", "--address", head["address"], "--submission-id", sid,
             "--working-dir", str(ROOT), "--",
             "python", "-m", "meal_ray.cli", "distill", "--config", "jobs/fashion-mnist-quick.yaml",
             "--set", f"teachers.models={json.dumps(served_teachers(head))}",  # the job names the served teachers
             "--output", str(out), "--tracking-uri", f"sqlite:///{db}", timeout=900)
    status = _cli(head, "python", "-c", "import sys; from ray.job_submission import JobSubmissionClient as C; "
                  "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)", head["address"], sid)
    assert status.stdout.strip() == "SUCCEEDED", status.stderr[-2000:] + r.stdout[-4000:] + r.stderr[-4000:]
    assert r.returncode == 0 and "done: top-1" in r.stdout
    # the job's output (`ray job logs`): rank 0's epoch lines through the driver's progress view, no actor output
    assert "[meal-ray] epoch 2/2 | loss" in r.stdout and "RayTrainWorker" not in r.stdout, r.stdout[-4000:]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and len(metrics["history"]) == 2 and metrics["count"] == 2000
    assert all(0 <= h["teacher_wait_frac"] <= 1 and h["teacher_latency_ms"] > 0 for h in metrics["history"])
    assert (out / "student" / "model.safetensors").is_file()
    run = MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["teachers.source"] == "served" and run.data.params["run.num_workers"] == "2"
    assert run.data.metrics["final_top1"] == pytest.approx(metrics["top1"])


def test_embedded_ray_starts_despite_a_stale_record_and_its_serve_opens_no_http_port(tmp_path):
    """A `ray start --block` stopped by a signal leaves /tmp/ray/ray_current_cluster behind; a bare ray.init() then
    tries to join that dead cluster and refuses num_cpus. Embedded Ray is started with address="local". The Serve
    that the demo starts there runs no HTTP proxy: nothing listens on Serve's port 8000."""
    record = Path("/tmp/ray/ray_current_cluster")
    saved = record.read_text() if record.exists() else None
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"127.0.0.1:{_free_ports(1)[0]}")
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
