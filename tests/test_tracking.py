"""MLflow outages lose nothing: a real `mlflow server` cut off mid-run and reachable again, or started only after the
job."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import yaml
from click.testing import CliRunner
from conftest import local_distill_job

from meal_ray.tracking import PENDING_FILE, Tracker

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on loopback over one sqlite store and artifact folder, stoppable and restartable."""

    def __init__(self, root):
        self.root, self.port, self.proc = root, _port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


class Gate:
    """A loopback TCP relay in front of a running server. ``close()`` makes the server unreachable as a stopped one
    is (new connections refused, open ones cut), ``open()`` lets clients through again: an outage without paying
    for an `mlflow server` start each time it ends."""

    def __init__(self, port: int):
        self.target, self.port, self.listener, self.links = port, _port(), None, []
        self.uri = f"http://127.0.0.1:{self.port}"

    def open(self):
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()
        return self

    def close(self):
        for s in [self.listener, *self.links]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.links = []

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.links += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _history(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_metrics_logged_during_an_outage_reach_the_server_when_it_returns(tmp_path):
    from mlflow.tracking import MlflowClient

    server = Server(tmp_path).start()
    gate = Gate(server.port).open()  # the tracker's way to the server
    run_dir, messages = tmp_path / "run", []
    run_dir.mkdir()
    tracker = Tracker(gate.uri, log=messages.append, spool_dir=run_dir, retry_after_s=0)
    run_id = tracker.start("outage", "run", {"optim": {"lr": 0.1}})
    tracker.log_metrics({"loss": 1.0}, step=0)
    (run_dir / "notes.txt").write_text("epoch 1")
    try:
        gate.close()
        tracker.log_metrics({"loss": 0.9}, step=1)  # the server is away: kept in the run directory
        tracker.log_artifact(run_dir / "notes.txt")
        tracker.log_metrics({"loss": 0.8}, step=2)
        assert (run_dir / PENDING_FILE).exists() and len((run_dir / PENDING_FILE).read_text().splitlines()) == 3
        assert len(messages) == 1 and "kept in" in messages[0] and "meal-ray tracking sync" in messages[0]
        gate.open()
        tracker.log_metrics({"loss": 0.7}, step=3)  # back: the kept records go first, in order
        assert not (run_dir / PENDING_FILE).exists() and "is back" in messages[-1]
        assert _history(server.uri, run_id, "loss") == [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7)]
        assert [a.path for a in MlflowClient(server.uri).list_artifacts(run_id)] == ["notes.txt"]

        # it never comes back during the run: everything stays on disk; one command sends it later
        gate.close()
        tracker.log_metrics({"loss": 0.6}, step=4)
        tracker.end("FINISHED")
        (run_dir / "run.json").write_text(f'{{"tracking_uri": "{gate.uri}"}}')
        from meal_ray.cli import main

        res = CliRunner().invoke(main, ["tracking", "sync", str(run_dir)])
        assert res.exit_code == 1 and "still unreachable" in res.output and "Traceback" not in res.output
        assert (run_dir / PENDING_FILE).exists()
        gate.open()
        res = CliRunner().invoke(main, ["tracking", "sync", str(run_dir)])
        assert res.exit_code == 0 and "sent 2 kept record(s)" in res.output, res.output
        assert _history(server.uri, run_id, "loss")[-1] == (4, 0.6)
        assert MlflowClient(server.uri).get_run(run_id).info.status == "FINISHED"
        assert not (run_dir / PENDING_FILE).exists()
    finally:
        gate.close()
        server.stop()


def test_a_run_created_while_the_server_is_down_reaches_it_when_it_starts(tmp_path):
    """The server is not up when the run starts: its creation (experiment, name, params, tags, parent) is kept with
    the records after it, under a placeholder id, and all go, creation first, at the first call that reaches it."""
    from mlflow.tracking import MlflowClient

    from meal_ray.tracking import PLACEHOLDER_PREFIX, RUN_IDS_FILE

    server = Server(tmp_path)  # not started yet
    run_dir, messages = tmp_path / "run", []
    run_dir.mkdir()
    tracker = Tracker(server.uri, log=messages.append, spool_dir=run_dir, retry_after_s=0)
    placeholder = tracker.start("late", "early-run", {"optim": {"lr": 0.1}}, tags={"meal_ray.stage": "x"})
    assert placeholder.startswith(PLACEHOLDER_PREFIX) and tracker.url() is None
    tracker.log_metrics({"loss": 1.0}, step=0)
    assert len((run_dir / PENDING_FILE).read_text().splitlines()) == 2 and "kept in" in messages[0]
    try:
        server.start()
        tracker.log_metrics({"loss": 0.9}, step=1)
        run_id = tracker.run_id
        assert run_id != placeholder and not (run_dir / PENDING_FILE).exists()
        run = MlflowClient(server.uri).get_run(run_id)
        assert run.info.run_name == "early-run" and run.data.params == {"optim.lr": "0.1"}
        assert run.data.tags["meal_ray.stage"] == "x"
        assert _history(server.uri, run_id, "loss") == [(0, 1.0), (1, 0.9)]
        assert json.loads((run_dir / RUN_IDS_FILE).read_text()) == {placeholder: run_id}
        # a later process given the placeholder (run.json's, on --resume) reopens the same run
        again = Tracker(server.uri, placeholder, spool_dir=run_dir)
        assert again.run_id == run_id and again.start("late", "early-run", {}) == run_id
    finally:
        server.stop()


def test_a_job_run_while_the_server_is_down_is_created_by_tracking_sync_with_every_epoch(tmp_path, ray_cluster,
                                                                                        tiny_teachers):
    """A whole distill job with its MLflow server down from the start: the driver, the run's one writer (the workers
    hand it their epoch metrics), keeps everything; `meal-ray tracking sync` creates the run once the server is up,
    with each epoch's metrics, the final ones, the artifacts and the model, and names it in run.json."""
    from mlflow.tracking import MlflowClient

    from meal_ray.cli import main
    from meal_ray.tracking import PLACEHOLDER_PREFIX

    server = Server(tmp_path)
    job = local_distill_job("late-server", tiny_teachers, epochs=2, train_subset=256, val_subset=200,
                            experiment="late")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["distill", "--config", str(tmp_path / "job.yaml"), "--output", str(out),
                                    "--tracking-uri", server.uri])
    assert res.exit_code == 0, res.output
    placeholder = json.loads((out / "run.json").read_text())["mlflow_run_id"]
    assert placeholder.startswith(PLACEHOLDER_PREFIX) and (out / PENDING_FILE).exists()
    try:
        server.start()
        res = CliRunner().invoke(main, ["tracking", "sync", str(out)])
        assert res.exit_code == 0, res.output
        run_id = json.loads((out / "run.json").read_text())["mlflow_run_id"]
        assert run_id == json.loads((out / "metrics.json").read_text())["mlflow_run_id"] != placeholder
        client = MlflowClient(server.uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["optim.epochs"] == "2"
        history = json.loads((out / "metrics.json").read_text())["history"]
        assert _history(server.uri, run_id, "val_top1") == [(h["epoch"], h["val_top1"]) for h in history]
        assert [s for s, _ in _history(server.uri, run_id, "val_top1")] == [1, 2]
        assert "final_top1" in run.data.metrics
        assert {"config.yaml", "metrics.json", "student"} <= {a.path for a in client.list_artifacts(run_id)}
        assert client.search_logged_models([run.info.experiment_id])  # the student as an MLflow model
    finally:
        server.stop()


def test_a_record_the_store_refuses_is_dropped_and_holds_back_nothing(tmp_path):
    """A record the store refuses itself (here a metric name that resolves like a path) would be refused again if
    kept: it is dropped with a warning, and the records after it, kept ones included, are sent."""
    import json

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir, messages = tmp_path / "run", []
    run_dir.mkdir()
    tracker = Tracker(uri, log=messages.append, spool_dir=run_dir, retry_after_s=0)
    run_id = tracker.start("refused", "run", {})
    tracker.log_metrics({"a/./b": 1.0}, step=0)
    assert not (run_dir / PENDING_FILE).exists()
    assert "refused log metrics" in messages[-1] and "INVALID_PARAMETER_VALUE" in messages[-1], messages
    tracker.log_metrics({"loss": 0.5}, step=0)
    assert _history(uri, run_id, "loss") == [(0, 0.5)]
    # one such record already kept (by an older meal-ray) goes at the next send; the one kept after it is sent
    (run_dir / PENDING_FILE).write_text("".join(
        json.dumps({"kind": "metrics", "run_id": run_id, "items": [[name, value, 0, 1]]}) + "\n"
        for name, value in (("a/./b", 1.0), ("loss", 0.4))))
    tracker.log_metrics({"loss": 0.3}, step=2)
    assert not (run_dir / PENDING_FILE).exists() and "refused a kept metrics record" in messages[-1], messages
    assert _history(uri, run_id, "loss") == [(0, 0.5), (1, 0.4), (2, 0.3)]


def test_a_run_link_says_what_serves_it():
    """A tracking server's run page is on the server; a local store's on `mlflow ui`, which the line names."""
    from meal_ray.tracking import run_url, ui_hint

    assert run_url("http://mlflow.internal:5000/", "3", "abc") == \
        "http://mlflow.internal:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert ui_hint("http://mlflow.internal:5000") == ""
    assert run_url("sqlite:///runs/mlflow.db", "3", "abc").startswith("http://127.0.0.1:5000/#/experiments/3/runs/abc")
    assert ui_hint("sqlite:///runs/mlflow.db") == " (after `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`)"
