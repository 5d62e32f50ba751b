"""MLflow outages lose nothing: a real `mlflow server` stopped mid-run and started again."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from click.testing import CliRunner

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


def _history(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_metrics_logged_during_an_outage_reach_the_server_when_it_returns(tmp_path):
    from mlflow.tracking import MlflowClient

    server = Server(tmp_path).start()
    run_dir, messages = tmp_path / "run", []
    run_dir.mkdir()
    tracker = Tracker(server.uri, log=messages.append, spool_dir=run_dir, retry_after_s=0)
    run_id = tracker.start("outage", "run", {"optim": {"lr": 0.1}})
    tracker.log_metrics({"loss": 1.0}, step=0)
    (run_dir / "notes.txt").write_text("epoch 1")
    try:
        server.stop()
        tracker.log_metrics({"loss": 0.9}, step=1)  # the server is away: kept in the run directory
        tracker.log_artifact(run_dir / "notes.txt")
        tracker.log_metrics({"loss": 0.8}, step=2)
        assert (run_dir / PENDING_FILE).exists() and len((run_dir / PENDING_FILE).read_text().splitlines()) == 3
        assert len(messages) == 1 and "kept in" in messages[0] and "meal-ray tracking sync" in messages[0]
        server.start()
        tracker.log_metrics({"loss": 0.7}, step=3)  # back: the kept records go first, in order
        assert not (run_dir / PENDING_FILE).exists() and "is back" in messages[-1]
        assert _history(server.uri, run_id, "loss") == [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7)]
        assert [a.path for a in MlflowClient(server.uri).list_artifacts(run_id)] == ["notes.txt"]

        # it never comes back during the run: everything stays on disk; one command sends it later
        server.stop()
        tracker.log_metrics({"loss": 0.6}, step=4)
        tracker.end("FINISHED")
        (run_dir / "run.json").write_text(f'{{"tracking_uri": "{server.uri}"}}')
        from meal_ray.cli import main

        res = CliRunner().invoke(main, ["tracking", "sync", str(run_dir)])
        assert res.exit_code == 1 and "still unreachable" in res.output and "Traceback" not in res.output
        assert (run_dir / PENDING_FILE).exists()
        server.start()
        res = CliRunner().invoke(main, ["tracking", "sync", str(run_dir)])
        assert res.exit_code == 0 and "sent 2 kept record(s)" in res.output, res.output
        assert _history(server.uri, run_id, "loss")[-1] == (4, 0.6)
        assert MlflowClient(server.uri).get_run(run_id).info.status == "FINISHED"
        assert not (run_dir / PENDING_FILE).exists()
    finally:
        if server.proc.poll() is None:
            server.stop()
