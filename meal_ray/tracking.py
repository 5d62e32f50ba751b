"""MLflow tracking that never stops training and loses nothing.

If the store is unreachable, the tracker says so once, keeps what it could not send in the run
directory (``mlflow-pending.jsonl``: the run's creation, metrics, artifacts, the model, the run's end)
and tries again at the next call after a pause; once the server is back the pending records go first,
in order. If it never comes back, ``meal-ray tracking sync RUN_DIR`` sends them later. A run whose
creation is kept goes by a placeholder id (``pending-...``) until it exists; ``mlflow-run-ids.json``
in the run directory then maps the placeholder to MLflow's id.

One process owns a run: the job's driver (train workers hand their epoch metrics to it).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

# Fail fast on an unreachable tracking server instead of MLflow's minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def default_tracking_uri() -> str:
    """A local sqlite store in the working directory (MLflow 3's default), as an absolute URI for workers."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


_URI_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def redact(value) -> str:
    """A param value as text with any URI's ``user:password@`` replaced by ``***@``: a tracking or storage URI that
    carries credentials must not end up readable by everyone who can see the run."""
    return _URI_CREDENTIALS.sub("***@", str(value))


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


# what a store answers when it refuses a record itself (an invalid name or value, a deleted run): sending it again
# would be refused the same way, so such a record is dropped with a warning instead of kept, where it would hold
# back every record after it
REFUSED_CODES = ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE")
PENDING_FILE = "mlflow-pending.jsonl"
RUN_IDS_FILE = "mlflow-run-ids.json"  # placeholder run id -> MLflow's, for runs created from the spool
PLACEHOLDER_PREFIX = "pending-"
#: MLflow 3 experiment kind: "custom_model_development" is the UI's "Machine learning" (runs, metrics, charts), not
#: the GenAI view (traces, evaluations). MLflow 3.17's UI shows whichever workflow its header switch (or the URL's
#: ``?workflowType=machine_learning``) selects; older 3.x UIs and MLflow's own tools read this tag.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
PARENT_RUN_TAG = "mlflow.parentRunId"  # what mlflow.start_run(nested=True) sets: the UI nests the run under its parent
MODEL_NAME = "student"  # the logged MLflow model's name (runs:/<run_id>/student in the run's Models)


def metric_key(name: str) -> str:
    """A readable MLflow metric key: lower-case words joined by ``_``, ``/`` kept as MLflow's group separator
    (``MEAL V2 (ensemble soft labels)`` -> ``meal_v2_ensemble_soft_labels``)."""
    parts = [re.sub(r"[^a-z0-9.\-]+", "_", p.strip().lower()).strip("_") for p in str(name).split("/")]
    return "/".join(p for p in parts if p) or "_"


class Tracker:
    """Thin MlflowClient wrapper: every call is best-effort; what fails is kept in ``spool_dir`` and sent later."""

    def __init__(self, uri: Optional[str] = None, run_id: Optional[str] = None, log=None,
                 spool_dir: Optional[str | Path] = None, retry_after_s: float = 30.0):
        self.uri = uri or default_tracking_uri()
        self.disabled = False  # no run and no spool: nothing more can be done
        self.spool = Path(spool_dir) / PENDING_FILE if spool_dir else None
        self.run_id = self.resolve(run_id) if run_id else run_id
        self.retry_after_s = retry_after_s
        self._down_since: Optional[float] = None
        self._next_try = 0.0
        self._log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self._client = None
        self.model_uri: Optional[str] = None  # set once the student is logged as an MLflow model

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

    def _refused(self, what: str, e: Exception) -> bool:
        """True (with a warning) when the store refused the record itself rather than being away."""
        if getattr(e, "error_code", None) not in REFUSED_CODES:
            return False
        self._log(f"WARNING: MLflow tracking at {self.uri} refused {what} ({e.error_code}: {str(e)[:300]}); "
                  "that record is dropped (sent again it would be refused again); the run's other records are sent.")
        return True

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

    def _run_ids(self) -> dict:
        path = self.spool.parent / RUN_IDS_FILE if self.spool else None
        try:
            return json.loads(path.read_text()) if path is not None else {}
        except (OSError, ValueError):
            return {}

    def resolve(self, run_id: str) -> str:
        """MLflow's id of ``run_id``: itself, or, for a placeholder whose creation has been sent, the run's id."""
        if not str(run_id).startswith(PLACEHOLDER_PREFIX):
            return run_id
        return self._run_ids().get(run_id, run_id)

    def _send(self, record: dict) -> None:
        """One spooled record to the server (raises on failure)."""
        from mlflow.entities import Metric

        kind = record["kind"]
        if kind == "start":
            return self._create_run(record)
        record = dict(record, run_id=self.resolve(record["run_id"]))
        if record["run_id"].startswith(PLACEHOLDER_PREFIX):  # its creation was lost (a spool edited by hand)
            raise RuntimeError(f"run {record['run_id']} was never created: its creation is not in {self.spool}")
        if kind == "metrics":
            items = [Metric(k, v, ts, step) for k, v, ts, step in record["items"]]
            for i in range(0, len(items), 1000):
                self.client.log_batch(record["run_id"], metrics=items[i:i + 1000])
        elif kind == "artifact":
            fn = self.client.log_artifacts if Path(record["path"]).is_dir() else self.client.log_artifact
            fn(record["run_id"], record["path"], record.get("artifact_path"))
        elif kind == "model":
            return self._send_model(record)
        elif kind == "end":
            self.client.set_terminated(record["run_id"], record["status"])
        return None

    def _create_run(self, record: dict) -> str:
        """Create the run a start record describes (in its experiment, nested under its parent, with its params and
        inputs); a placeholder id becomes MLflow's, here and in the run directory's RUN_IDS_FILE."""
        from mlflow.entities import Param

        from meal_ray.files import write_text_atomic

        placeholder = record.get("placeholder")
        run_id = self.resolve(placeholder) if placeholder else None
        if run_id is None or run_id == placeholder:  # not created yet (a retry after a half-sent creation is not)
            tags = dict(record.get("tags") or {})
            if record.get("parent_run_id"):
                tags[PARENT_RUN_TAG] = self.resolve(record["parent_run_id"])
            exp_id = self.experiment_id(record["experiment"])
            run_id = self.client.create_run(exp_id, run_name=record["run_name"], tags=tags).info.run_id
            if placeholder and self.spool is not None:
                write_text_atomic(self.spool.parent / RUN_IDS_FILE,
                                  json.dumps(dict(self._run_ids(), **{placeholder: run_id}), indent=2))
        if placeholder and self.run_id == placeholder:
            self.run_id = run_id
        items = [Param(k, v) for k, v in record["params"]]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])
        if record.get("datasets"):
            self.client.log_inputs(run_id, datasets=[_dataset_input(**d) for d in record["datasets"]])
        return run_id

    def _send_model(self, record: dict):
        """Log a meal-ray export as an MLflow pytorch model of the run (and register it when asked). An unreachable
        store raises (the record is kept, as any other); any other failure (a name the registry refuses, an export
        since deleted) is said once and dropped, so it never holds back the records after it."""
        experiment_id = self.client.get_run(record["run_id"]).info.experiment_id
        try:
            return self._log_model(record, experiment_id)
        except Exception as e:  # noqa: BLE001
            if _is_outage(e):
                raise
            self._log(f"WARNING: the student was not logged as an MLflow model ({type(e).__name__}: {str(e)[:300]}); "
                      f"the run's other records are sent; the export is in {record['path']}.")
            return None

    def _log_model(self, record: dict, experiment_id: str):
        import logging

        import mlflow.pytorch
        import numpy as np
        import timm
        from mlflow.models import infer_signature

        from meal_ray.models import load_export, read_export_config

        path, run_id = Path(record["path"]), record["run_id"]
        model, config = load_export(path), read_export_config(path)
        shape = [int(v) for v in config["pretrained_cfg"]["input_size"]]
        example = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)  # a normalized batch
        import torch

        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        labels = config.get("label_names") or []
        logged = self.client.create_logged_model(
            experiment_id, name=record.get("name", MODEL_NAME), source_run_id=run_id,
            params={k: str(v) for k, v in (("architecture", config.get("architecture")),
                                           ("num_classes", config.get("num_classes")),
                                           ("input_size", "x".join(map(str, shape)))) if v is not None})
        quiet = logging.getLogger("mlflow.pytorch")  # its pickle warning: the safetensors export is the safe copy
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with _tracking_uri(self.uri):
                info = mlflow.pytorch.log_model(
                    model, name=record.get("name", MODEL_NAME), model_id=logged.model_id, run_id=run_id,
                    signature=infer_signature(example, output), input_example=example, step=record.get("step", 0),
                    serialization_format="pickle",  # load_model returns the timm module itself, any batch size
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"],
                    metadata={"label_names": labels, "timm_architecture": config.get("architecture"),
                              "data_config": config.get("pretrained_cfg", {})},
                    registered_model_name=record.get("registered_model_name"), await_registration_for=0)
        finally:
            quiet.setLevel(level)
        self.model_uri = info.model_uri
        return info

    def _deliver(self, record: dict, what: str):
        """Send now (pending records first) or, while the server is away, append to the spool. Returns what the
        send returned (None when kept)."""
        if self.disabled:
            return None
        if self._down_since is not None and time.monotonic() < self._next_try:
            self._keep(record)
            return None
        try:
            if self.spool is not None and self.spool.exists():
                self.flush()
            result = self._send(record)
        except Exception as e:  # noqa: BLE001
            if self._refused(what, e):
                return None
            self._failed(what, e)
            self._keep(record)
            return None
        if self._down_since is not None:
            self._log(f"MLflow tracking at {self.uri} is back after {time.monotonic() - self._down_since:.0f}s; "
                      "the records kept meanwhile were sent.")
            self._down_since = None
        return result

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
                try:
                    self._send(record)
                except Exception as e:  # noqa: BLE001
                    if not self._refused(f"a kept {record.get('kind', 'record')} record", e):
                        raise
                sent += 1
        finally:
            rest = lines[sent:]
            if rest:
                write_text_atomic(self.spool, "\n".join(rest) + "\n")
            else:
                self.spool.unlink(missing_ok=True)
        return sent

    def experiment_id(self, experiment: str) -> str:
        """The experiment's id, created as a model-training experiment when new (an existing one without a kind
        is marked too; a kind chosen in the UI is kept)."""
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return self.client.create_experiment(experiment, artifact_location=self._artifact_root(),
                                                 tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        if EXPERIMENT_KIND_TAG not in exp.tags:
            self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return exp.experiment_id

    def start(self, experiment: str, run_name: str, params: dict, tags: Optional[dict] = None,
              parent_run_id: Optional[str] = None, datasets: Sequence[dict] = ()) -> Optional[str]:
        """Create (or, with self.run_id set, reopen) the run and log params; ``parent_run_id`` nests it under that
        run (as ``mlflow.start_run(nested=True)`` does; a reopened run too: a demo stage resumed by a later demo moves
        under that demo's run); ``datasets`` (:func:`dataset_input`) become run inputs.
        With the store away and a spool, the creation is kept like any record and the run goes by a placeholder id
        until it is sent. Returns the run's id (None when nothing can be tracked)."""
        if self.run_id:
            if not self.run_id.startswith(PLACEHOLDER_PREFIX):  # a placeholder's creation is still in the spool
                self._safe("reopen run", lambda: self.client.update_run(self.run_id, status="RUNNING"))
                parent = parent_run_id and self.resolve(parent_run_id)
                if parent and not parent.startswith(PLACEHOLDER_PREFIX):  # a resumed demo stage: under the demo
                    self._safe("nest run", lambda: self.client.set_tag(self.run_id, PARENT_RUN_TAG, parent))
            return self.run_id
        record = {"kind": "start", "experiment": experiment, "run_name": run_name, "tags": dict(tags or {}),
                  "parent_run_id": parent_run_id, "datasets": list(datasets),
                  "params": [[k, redact(v)[:6000]] for k, v in flatten(params).items()]}
        if self.spool is None:
            self.run_id = self._safe("start run", self._create_run, record)
            return self.run_id
        self.run_id = record["placeholder"] = f"{PLACEHOLDER_PREFIX}{uuid.uuid4().hex}"
        self._deliver(record, "start run")  # sent: self.run_id is MLflow's now
        return self.run_id

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

    def log_model(self, export_dir: str | Path, registered_model_name: Optional[str] = None, step: int = 0,
                  name: str = MODEL_NAME):
        """The student export as an MLflow pytorch model of this run (signature and input example from its data
        config), registered as ``registered_model_name`` when given. Kept in the spool like any record while the
        server is away. Returns mlflow's ModelInfo, or None."""
        if not self.run_id:
            return None
        return self._deliver({"kind": "model", "run_id": self.run_id, "path": str(Path(export_dir).resolve()),
                              "name": name, "step": int(step), "registered_model_name": registered_model_name},
                             "log model")

    def url(self) -> Optional[str]:
        """The run's page in the MLflow UI (None without a run or when the store does not answer)."""
        if not self.run_id or self.run_id.startswith(PLACEHOLDER_PREFIX):
            return None
        exp_id = self._safe("get run", lambda: self.client.get_run(self.run_id).info.experiment_id)
        return run_url(self.uri, exp_id, self.run_id) if exp_id else None

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self._deliver({"kind": "end", "run_id": self.run_id, "status": status}, "end run")


def _is_outage(e: Exception) -> bool:
    """The store did not answer (connection refused or reset, timeouts, a 5xx after retries), as opposed to a
    request it refused."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(e).__name__}: {e}".lower()
    return any(s in text for s in ("max retries exceeded", "connection", "timed out", "timeout",
                                   "temporarily_unavailable", "503", "502", "504"))


@contextmanager
def _tracking_uri(uri: str):
    """MLflow's fluent tracking URI set to ``uri`` for a block, then put back as it was, MLFLOW_TRACKING_URI included
    (mlflow's own helper unsets that variable on the way out)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    old, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def dataset_input(name: str, source: str, context: str, digest_of, profile: Optional[dict] = None) -> dict:
    """A run input (:class:`mlflow.entities.Dataset`) for :meth:`Tracker.start`: ``digest_of`` is hashed into the
    digest (the same data and subset give the same digest), ``context`` is MLflow's ``training`` / ``evaluation``."""
    import hashlib

    digest = hashlib.sha256(json.dumps(digest_of, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return {"name": name, "digest": digest, "source": source, "context": context,
            "profile": json.dumps(profile or {}, default=str)}


def _dataset_input(name, digest, source, context, profile):
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return DatasetInput(Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}),
                                profile=profile),
                        tags=[InputTag("mlflow.data.context", context)])


def run_url(tracking_uri: str, experiment_id: Optional[str], run_id: Optional[str]) -> str:
    """Where a run opens in the MLflow UI (``mlflow ui`` on its default port for a local store), in the UI's
    model-training view."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def ui_hint(tracking_uri: str) -> str:
    """What opens a :func:`run_url`: nothing for a tracking server; for a local store, the ``mlflow ui`` command that
    serves it on that address."""
    return "" if tracking_uri.startswith("http") else f" (after `mlflow ui --backend-store-uri {tracking_uri}`)"


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
    _name_created_runs(run_dir, tracker, log)
    return sent


def _name_created_runs(run_dir: Path, tracker: Tracker, log) -> None:
    """run.json and metrics.json name the run by MLflow's id once a placeholder's creation has been sent."""
    from meal_ray.files import write_text_atomic

    for name in ("run.json", "metrics.json"):
        try:
            record = json.loads((run_dir / name).read_text())
        except (OSError, ValueError):
            continue
        placeholder = str(record.get("mlflow_run_id") or "")
        if placeholder.startswith(PLACEHOLDER_PREFIX) and tracker.resolve(placeholder) != placeholder:
            record["mlflow_run_id"] = tracker.resolve(placeholder)
            write_text_atomic(run_dir / name, json.dumps(record, indent=2, default=str))
            log(f"{name}: run {placeholder} is MLflow run {record['mlflow_run_id']}")
