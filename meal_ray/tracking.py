"""MLflow tracking that never stops training and loses nothing.

If the store is unreachable, the tracker says so once, keeps what it could not send in the run
directory (``mlflow-pending.jsonl``: metrics, artifacts, the run's end) and tries again at the next
call after a pause; once the server is back the pending records go first, in order. If it never
comes back, ``meal-ray tracking sync RUN_DIR`` sends them later.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

# Fail fast on an unreachable tracking server instead of MLflow's minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def default_tracking_uri() -> str:
    """A local sqlite store in the working directory (MLflow 3's default), as an absolute URI for workers."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{i}."))
        else:
            out[key] = v
    return out


PENDING_FILE = "mlflow-pending.jsonl"


class Tracker:
    """Thin MlflowClient wrapper: every call is best-effort; what fails is kept in ``spool_dir`` and sent later."""

    def __init__(self, uri: Optional[str] = None, run_id: Optional[str] = None, log=None,
                 spool_dir: Optional[str | Path] = None, retry_after_s: float = 30.0):
        self.uri = uri or default_tracking_uri()
        self.run_id = run_id
        self.disabled = False  # no run and no spool: nothing more can be done
        self.spool = Path(spool_dir) / PENDING_FILE if spool_dir else None
        self.retry_after_s = retry_after_s
        self._down_since: Optional[float] = None
        self._next_try = 0.0
        self._log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _safe(self, what: str, fn, *args, **kwargs):
        if self.disabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never break training
            self._failed(what, e)
            return None

    def _failed(self, what: str, e: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            kept = (f"what it cannot send is kept in {self.spool} and sent when the server is back "
                    f"(or later: meal-ray tracking sync {self.spool.parent})") if self.spool else "no more tracking"
            self._log(f"WARNING: MLflow tracking at {self.uri} failed ({what}: {type(e).__name__}: {str(e)[:200]}); "
                      f"training goes on; {kept}.")
        self._next_try = time.monotonic() + self.retry_after_s
        if self.spool is None:
            self.disabled = True

    def _send(self, record: dict) -> None:
        """One spooled record to the server (raises on failure)."""
        from mlflow.entities import Metric

        kind = record["kind"]
        if kind == "metrics":
            items = [Metric(k, v, ts, step) for k, v, ts, step in record["items"]]
            for i in range(0, len(items), 1000):
                self.client.log_batch(record["run_id"], metrics=items[i:i + 1000])
        elif kind == "artifact":
            fn = self.client.log_artifacts if Path(record["path"]).is_dir() else self.client.log_artifact
            fn(record["run_id"], record["path"], record.get("artifact_path"))
        elif kind == "end":
            self.client.set_terminated(record["run_id"], record["status"])

    def _deliver(self, record: dict, what: str) -> None:
        """Send now (pending records first) or, while the server is away, append to the spool."""
        if self.disabled:
            return
        if self._down_since is not None and time.monotonic() < self._next_try:
            self._keep(record)
            return
        try:
            if self.spool is not None and self.spool.exists():
                self.flush()
            self._send(record)
        except Exception as e:  # noqa: BLE001
            self._failed(what, e)
            self._keep(record)
            return
        if self._down_since is not None:
            self._log(f"MLflow tracking at {self.uri} is back after {time.monotonic() - self._down_since:.0f}s; "
                      "the records kept meanwhile were sent.")
            self._down_since = None

    def _keep(self, record: dict) -> None:
        if self.spool is None:
            return
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spool, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def flush(self) -> int:
        """Send the spooled records in order; the ones not sent stay (rewritten atomically). Returns how many went;
        raises the first failure."""
        from meal_ray.files import write_text_atomic

        if self.spool is None or not self.spool.exists():
            return 0
        lines = [line for line in self.spool.read_text().splitlines() if line.strip()]
        sent = 0
        try:
            for line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash mid-write: nothing of it was logged
                    sent += 1
                    continue
                self._send(record)
                sent += 1
        finally:
            rest = lines[sent:]
            if rest:
                write_text_atomic(self.spool, "\n".join(rest) + "\n")
            else:
                self.spool.unlink(missing_ok=True)
        return sent

    def start(self, experiment: str, run_name: str, params: dict, tags: Optional[dict] = None) -> Optional[str]:
        """Create (or, with self.run_id set, reopen) the run and log params."""
        def _start():
            if self.run_id:
                self.client.update_run(self.run_id, status="RUNNING")
                return self.run_id
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = (exp.experiment_id if exp
                      else self.client.create_experiment(experiment, artifact_location=self._artifact_root()))
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags or {})
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])
            return self.run_id

        return self._safe("start run", _start)

    def _artifact_root(self) -> Optional[str]:
        """Keep a sqlite store's artifacts beside the database, not in whatever the working directory is."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        return None

    def log_metrics(self, metrics: dict, step: int) -> None:
        if not self.run_id:
            return
        ts = int(time.time() * 1000)
        items = [[re.sub(r"[^A-Za-z0-9_\-. /]", "_", k), float(v), ts, int(step)] for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        self._deliver({"kind": "metrics", "run_id": self.run_id, "items": items}, "log metrics")

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if not self.run_id:
            return
        self._deliver({"kind": "artifact", "run_id": self.run_id, "path": str(Path(path).resolve()),
                       "artifact_path": artifact_path}, "log artifact")

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self._deliver({"kind": "end", "run_id": self.run_id, "status": status}, "end run")


def sync_pending(run_dir: str | Path, uri: Optional[str] = None, log=print) -> int:
    """Send a run directory's kept MLflow records (``meal-ray tracking sync``). Returns how many were sent."""
    from meal_ray.errors import ConfigError

    run_dir = Path(run_dir)
    if not (run_dir / PENDING_FILE).exists():
        log(f"nothing to send: {run_dir / PENDING_FILE} does not exist (everything reached MLflow).")
        return 0
    if uri is None:
        try:
            uri = json.loads((run_dir / "run.json").read_text())["tracking_uri"]
        except (OSError, KeyError, ValueError):
            raise ConfigError(f"{run_dir} has no run.json naming its tracking URI; pass --tracking-uri.") from None
    tracker = Tracker(uri, spool_dir=run_dir)
    try:
        sent = tracker.flush()
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"MLflow at {uri} is still unreachable ({type(e).__name__}: {str(e)[:200]}); the records "
                          f"stay in {run_dir / PENDING_FILE}. Try again when it is up.") from None
    log(f"sent {sent} kept record(s) from {run_dir} to {uri}.")
    return sent
