"""MLflow tracking that never stops training: if the store is unreachable, say so once and go on."""

from __future__ import annotations

import math
import os
import re
import sys
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


class Tracker:
    """Thin MlflowClient wrapper: every call is best-effort; the first failure is reported once."""

    def __init__(self, uri: Optional[str] = None, run_id: Optional[str] = None, log=None):
        self.uri = uri or default_tracking_uri()
        self.run_id = run_id
        self.disabled = False
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
            self.disabled = True
            self._log(f"WARNING: MLflow tracking at {self.uri} failed ({what}: {type(e).__name__}: {str(e)[:200]}); "
                      "training goes on without tracking. Pass --tracking-uri to use another store.")
            return None

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
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(re.sub(r"[^A-Za-z0-9_\-. /]", "_", k), float(v), ts, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        self._safe("log metrics", self.client.log_batch, self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if not self.run_id:
            return
        p = Path(path)
        fn = self.client.log_artifacts if p.is_dir() else self.client.log_artifact
        self._safe("log artifact", fn, self.run_id, str(p), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self._safe("end run", self.client.set_terminated, self.run_id, status)
