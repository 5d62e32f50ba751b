"""Teachers as a Ray Serve application, and the soft-label source that talks to it.

One deployment per teacher (its own replicas, ``num_gpus``/``num_cpus``, autoscaling and
dynamic batching with ``@serve.batch``) behind an :class:`EnsembleIngress` that fans every
request out to all teachers concurrently and averages them (p_e = mean softmax, z_e = mean
logits, :func:`meal_ray.ensemble.average_teacher_outputs`).

Wire format (DESIGN.md section 2): a request is one mini-batch of crops as a uint8 numpy
array ``[B, C, H, W]``; each teacher replica applies its *own* preprocessing (resize,
mean/std from its timm data config). The ingress replies a dict with fp16 ``probs`` and
``logits`` ``[B, C]``, ``latency_s`` (teacher inference wall time measured in the ingress)
and ``num_classes``.

Deploy with a Serve config file (``import_path: meal_ray.serving:build_app``, see
``deployments/``): ``meal-ray teachers up --config deployments/fashion-mnist.yaml`` (embedded
local Ray, blocks until Ctrl-C) or ``serve deploy deployments/fashion-mnist.yaml`` on a running
cluster. Training reads from it through :class:`ServedSoftLabels` (deployment handles, no HTTP).

Ray lives only here and in the launchers/CLI; the teachers themselves are
:class:`meal_ray.ensemble.Teacher` (plain PyTorch).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
from ray import serve

from meal_ray.config import TeacherSpec
from meal_ray.errors import ClassCountMismatchError, ConfigError, ModelNotFoundError, TeachersNotRunningError, suggest

DEFAULT_APP_NAME = "meal-ray-teachers"
INGRESS_NAME = "ensemble"  # deployment name of the ingress inside the application
IMPORT_PATH = "meal_ray.serving:build_app"
APP_ARGS = ("teachers", "max_batch_size", "batch_wait_timeout_s", "autocast", "base_dir", "retry_s")
TEACHER_KEYS = ("name", "model", "weights", "pretrained")

HOW_TO_START = (
    "Start the teachers with `meal-ray teachers up --config deployments/fashion-mnist.yaml` "
    "(embedded local Ray; keep it running) or, on a running cluster (`ray start --head`), "
    "`serve deploy deployments/fashion-mnist.yaml`; check with `meal-ray teachers status` / `serve status`. "
    "Or train with teachers.source=local (in-process teachers)."
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- request validation


def validate_crops(images: Any, in_chans: Optional[int] = None) -> np.ndarray:
    """Check one request: a numpy uint8 array [B, C, H, W] with ``in_chans`` channels. Raise ValueError otherwise."""
    expected = f"uint8 numpy array of shape [B, {in_chans if in_chans is not None else 'C'}, H, W] (raw 0..255 pixels)"
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise ValueError(f"teacher request must be a {expected}; got {type(images).__name__}. "
                         "Send batch.images.numpy().")
    if images.dtype != np.uint8:
        raise ValueError(f"teacher request must be a {expected}; got dtype {images.dtype}. "
                         "Send the uint8 crops before normalization; each teacher normalizes them itself.")
    if images.ndim != 4:
        raise ValueError(f"teacher request must be a {expected}; got {images.ndim} dims, shape {tuple(images.shape)}.")
    if in_chans is not None and images.shape[1] != in_chans:
        raise ValueError(f"teacher request must be a {expected}; got {images.shape[1]} channels, "
                         f"shape {tuple(images.shape)}. The teachers take {in_chans}-channel images.")
    if min(images.shape) == 0:
        raise ValueError(f"teacher request must be a non-empty {expected}; got shape {tuple(images.shape)}.")
    return images


def _num_samples(requests: list) -> int:
    """serve.batch size function: a request is a mini-batch, so a batch's size is its number of crops."""
    return sum(len(r) for r in requests)


class _DropMaxOngoingWarning(logging.Filter):
    """Serve compares max_batch_size with max_ongoing_requests assuming one sample per request; ours count crops."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_ongoing_requests" not in record.getMessage() or "max_batch_size" not in record.getMessage()


# ----------------------------------------------------------------------------- deployments


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32,
                  logging_config={"enable_access_log": False})  # one line per request would flood the logs
class TeacherModel:
    """One frozen teacher. Requests (uint8 [b, C, H, W]) are merged by ``@serve.batch`` into one forward pass.

    ``max_batch_size`` counts *crops* (not requests): a merged batch never holds more crops
    than that; a larger request is split into chunks. Runs on CUDA when the replica has a GPU
    (``ray_actor_options: {num_gpus: 1}``), on CPU otherwise.
    """

    def __init__(self, spec: dict, autocast: Optional[str] = None, max_batch_size: int = 64,
                 batch_wait_timeout_s: float = 0.01):
        from meal_ray.ensemble import load_teacher

        logging.getLogger("ray.serve").addFilter(_DropMaxOngoingWarning())
        self.spec = TeacherSpec(**spec)
        self.name = self.spec.name or self.spec.model
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.teacher = load_teacher(self.spec, autocast).to(self.device)
        self.autocast = autocast
        self._batch_sizes: collections.deque = collections.deque(maxlen=10_000)
        self.reconfigure({"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s})

    def reconfigure(self, config: dict) -> None:
        """``user_config: {max_batch_size, batch_wait_timeout_s}`` in a Serve config tunes batching per teacher."""
        unknown = set(config) - {"max_batch_size", "batch_wait_timeout_s"}
        if unknown:
            raise ConfigError(f"unknown teacher user_config keys {sorted(unknown)}; use max_batch_size, batch_wait_timeout_s.")
        if "max_batch_size" in config:
            self.max_batch_size = int(config["max_batch_size"])
            if self.max_batch_size < 1:
                raise ConfigError(f"max_batch_size={self.max_batch_size} must be >= 1 (crops per forward pass).")
            self.infer_batch.set_max_batch_size(self.max_batch_size)
        if "batch_wait_timeout_s" in config:
            self.batch_wait_timeout_s = float(config["batch_wait_timeout_s"])
            if self.batch_wait_timeout_s < 0:
                raise ConfigError(f"batch_wait_timeout_s={self.batch_wait_timeout_s} must be >= 0.")
            self.infer_batch.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 [b, C, H, W] -> float32 logits [b, num_classes]. Validated here, before it joins a batch."""
        images = validate_crops(images, self.teacher.in_chans)
        step = self.max_batch_size
        chunks = [images[i:i + step] for i in range(0, len(images), step)]
        outs = await asyncio.gather(*(self.infer_batch(c) for c in chunks))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=_num_samples)
    async def infer_batch(self, requests: list) -> list:
        self._batch_sizes.append(_num_samples(requests))
        # Requests of different crop sizes (two jobs sharing the pool) run as separate forward passes.
        groups: dict = collections.defaultdict(list)
        for i, r in enumerate(requests):
            groups[r.shape[1:]].append(i)
        results: list = [None] * len(requests)
        for idx in groups.values():
            merged = np.concatenate([requests[i] for i in idx])
            logits = await asyncio.to_thread(self._forward, merged)  # keeps the replica's event loop free
            offsets = np.cumsum([0] + [len(requests[i]) for i in idx])
            for j, i in enumerate(idx):
                results[i] = logits[offsets[j]:offsets[j + 1]]
        return results

    def _forward(self, merged: np.ndarray) -> np.ndarray:
        return self.teacher(torch.from_numpy(merged)).cpu().numpy().astype(np.float32, copy=False)

    def info(self) -> dict:
        t = self.teacher
        return {"name": self.name, "model": self.spec.model, "weights": self.spec.weights,
                "pretrained": self.spec.pretrained, "num_classes": t.num_classes, "in_chans": t.in_chans,
                "input_size": [t.in_chans, *t.size], "interpolation": t.interpolation,
                "mean": [round(float(v) / 255, 6) for v in t.mean.flatten()],
                "std": [round(float(v) / 255, 6) for v in t.std.flatten()],
                "device": str(self.device), "autocast": self.autocast,
                "max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s}

    def batch_sizes(self) -> list:
        """Crops per forward pass, one entry per merged batch this replica ran (most recent 10 000)."""
        return list(self._batch_sizes)

    def replica_actor_name(self) -> str:
        """This replica's Ray actor name (namespace ``serve``), e.g. to kill it in a fault-tolerance test."""
        return serve.get_replica_context().replica_id.to_full_id_str()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64,
                  logging_config={"enable_access_log": False})
class EnsembleIngress:
    """Fans each request out to every teacher deployment concurrently and averages their outputs."""

    def __init__(self, teachers: list, names: list, retry_s: float = 60.0):
        self.teachers = list(teachers)  # DeploymentHandles (Serve replaces the bound deployments)
        self.names = list(names)
        self.retry_s = float(retry_s)
        self._info: Optional[dict] = None

    async def _teacher_info(self) -> dict:
        if self._info is None:
            infos = await asyncio.gather(*(self._call(h.info) for h in self.teachers))
            classes = {i["num_classes"] for i in infos}
            chans = {i["in_chans"] for i in infos}
            if len(classes) != 1:
                raise ClassCountMismatchError(
                    "the served teachers disagree on the number of classes: "
                    + ", ".join(f"{i['name']}={i['num_classes']}" for i in infos) + "; serve teachers of one dataset.")
            if len(chans) != 1:
                raise ClassCountMismatchError(
                    "the served teachers disagree on input channels: "
                    + ", ".join(f"{i['name']}={i['in_chans']}" for i in infos) + ".")
            self._info = {"num_classes": classes.pop(), "in_chans": chans.pop(), "teachers": infos}
        return self._info

    async def _call(self, method, *args):
        """Call a teacher; if its replica died, wait for Serve to replace it (up to ``retry_s``)."""
        from ray.exceptions import RayActorError

        deadline = time.monotonic() + self.retry_s
        delay = 0.2
        while True:
            try:
                return await method.remote(*args)
            except RayActorError:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def __call__(self, images: np.ndarray) -> dict:
        info = await self._teacher_info()
        images = validate_crops(images, info["in_chans"])
        from meal_ray.ensemble import average_teacher_outputs

        start = time.perf_counter()
        logits = await asyncio.gather(*(self._call(h, images) for h in self.teachers))
        latency = time.perf_counter() - start
        probs, mean_logits = average_teacher_outputs([torch.tensor(z) for z in logits])  # replies are read-only
        return {"probs": probs.numpy().astype(np.float16), "logits": mean_logits.numpy().astype(np.float16),
                "latency_s": latency, "num_classes": int(probs.shape[1])}

    async def info(self) -> dict:
        """num_classes, in_chans and each teacher's name, architecture, input size, preprocessing and device."""
        info = await self._teacher_info()
        return {**info, "teacher_names": list(self.names)}


# ----------------------------------------------------------------------------- application builder


def parse_teachers(args: dict, base_dir: Optional[str] = None, check_files: bool = True) -> list:
    """Validate build_app ``args['teachers']``; return TeacherSpec-like dicts with names and absolute weights paths."""
    teachers = args.get("teachers")
    if not isinstance(teachers, list) or not teachers:
        raise ConfigError("args.teachers must be a non-empty list, e.g. "
                          "[{name: resnet18, model: resnet18, weights: runs/fmnist-teacher-resnet18/student}].")
    from meal_ray.models import _check_name

    base = Path(base_dir or args.get("base_dir") or os.getcwd())
    specs, names = [], set()
    for i, t in enumerate(teachers):
        t = {"model": t} if isinstance(t, str) else dict(t or {})
        for key in t:
            if key not in TEACHER_KEYS:
                raise ConfigError(f"unknown key {key!r} in args.teachers[{i}].{suggest(key, TEACHER_KEYS)} "
                                  f"Valid keys: {', '.join(TEACHER_KEYS)}.")
        if not t.get("model"):
            raise ConfigError(f"args.teachers[{i}] needs a timm architecture: model: resnet18.")
        _check_name(t["model"])
        name = t.get("name") or f"teacher{i}"
        if name in names or name == INGRESS_NAME or "#" in name or "/" in name:
            raise ConfigError(f"teacher deployment name {name!r} must be unique, not {INGRESS_NAME!r}, "
                              "and contain no '#' or '/'.")
        names.add(name)
        weights = t.get("weights")
        if weights:
            path = Path(os.path.expanduser(str(weights)))
            path = path if path.is_absolute() else base / path
            if check_files and not path.exists():
                hint = ""
                if "fmnist-teacher-" in str(weights):
                    job = str(weights).split("fmnist-teacher-")[1].split("/")[0]
                    hint = f" Produce it with `meal-ray pretrain --config jobs/fmnist-teacher-{job}.yaml`."
                raise ModelNotFoundError(
                    f"teacher {name!r}: weights {weights!r} not found (looked at {path}; relative paths are "
                    f"resolved against {base}).{hint} Or give an absolute path / the right working directory.")
            weights = str(path)
        specs.append({"name": name, "model": t["model"], "weights": weights, "pretrained": bool(t.get("pretrained", False))})
    return specs


def build_app(args: dict) -> serve.Application:
    """Serve application builder (``import_path: meal_ray.serving:build_app``).

    ``args``: ``{"teachers": [{"name", "model", "weights", "pretrained"}, ...], "max_batch_size": 64,
    "batch_wait_timeout_s": 0.01, "autocast": null, "base_dir": null, "retry_s": 60}``.
    One deployment per teacher, named after the teacher (``teacher<i>`` by default), plus the
    ingress deployment ``ensemble``; a Serve config sets each one's replicas, autoscaling,
    ``ray_actor_options`` and ``max_ongoing_requests`` under ``deployments:``. Relative weights
    paths are resolved against ``base_dir`` (default: the working directory of the deploy).
    """
    args = dict(args or {})
    for key in args:
        if key not in APP_ARGS:
            raise ConfigError(f"unknown application arg {key!r}.{suggest(key, APP_ARGS)} Valid args: {', '.join(APP_ARGS)}.")
    autocast = args.get("autocast")
    if autocast not in (None, "bf16", "fp16"):
        raise ConfigError(f"args.autocast={autocast!r}: use bf16, fp16 or null.")
    max_batch_size = args.get("max_batch_size", 64)
    wait = args.get("batch_wait_timeout_s", 0.01)
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ConfigError(f"args.max_batch_size={max_batch_size!r} must be a whole number >= 1 (crops per forward pass).")
    if not isinstance(wait, (int, float)) or wait < 0:
        raise ConfigError(f"args.batch_wait_timeout_s={wait!r} must be a number >= 0 (seconds).")
    specs = parse_teachers(args)
    bound = [TeacherModel.options(name=s["name"]).bind(s, autocast, max_batch_size, float(wait)) for s in specs]
    return EnsembleIngress.options(name=INGRESS_NAME).bind(bound, [s["name"] for s in specs],
                                                           float(args.get("retry_s", 60.0)))


# ----------------------------------------------------------------------------- the served soft-label source


def _connect(address: Optional[str] = None) -> None:
    """Connect this process to a running Ray cluster (never starts one)."""
    from meal_ray.launch import ensure_ray

    try:
        ensure_ray(address, start_local=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or os.environ.get("RAY_ADDRESS") or "auto"
        raise TeachersNotRunningError(f"no Ray cluster found at {where!r} ({str(e).splitlines()[0]}). "
                                      f"{HOW_TO_START}") from None


def _name(state) -> str:
    """Serve status enums print as 'ApplicationStatus.RUNNING'; we want 'RUNNING'."""
    return str(getattr(state, "value", state))


def _app_status(app_name: str):
    """The application's Serve status object, or None when it (or Serve) is not there."""
    try:
        return serve.status().applications.get(app_name)
    except Exception:  # no Serve controller on this cluster
        return None


class ServedSoftLabels:
    """Soft labels from the Serve teacher application, with ``prefetch`` batches in flight.

    Same interface as :class:`meal_ray.soft_labels.LocalSoftLabels`. Works on the driver and
    inside Ray Train workers (the handle is obtained in the process that constructs it).
    """

    name = "served"

    def __init__(self, app_name: str = DEFAULT_APP_NAME, prefetch: int = 4, address: Optional[str] = None,
                 timeout_s: Optional[float] = 600.0):
        from ray.serve.exceptions import RayServeException

        from meal_ray.soft_labels import PrefetchWindow

        _connect(address)
        self.app_name, self.timeout_s = app_name, timeout_s
        status = _app_status(app_name)
        state = _name(getattr(status, "status", "NOT_DEPLOYED"))
        if status is None or state in ("DEPLOY_FAILED", "DELETING", "NOT_STARTED"):
            reason = f"status {state}" + (f": {status.message}" if status is not None and status.message else "")
            raise TeachersNotRunningError(f"the Serve teacher application {app_name!r} is not running ({reason}). "
                                          f"{HOW_TO_START}")
        try:
            self.handle = serve.get_app_handle(app_name)
        except RayServeException as e:
            raise TeachersNotRunningError(f"the Serve teacher application {app_name!r} is not running ({e}). "
                                          f"{HOW_TO_START}") from None
        self._info: Optional[dict] = None
        self.window = PrefetchWindow(self._submit, self._collect, prefetch)

    def _submit(self, batch):
        images = batch.images
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().contiguous().numpy()
        # zero-copy: the array is serialized when the request goes out; the window keeps the batch until collected
        return self.handle.remote(images), len(images)

    def _collect(self, pending) -> tuple:
        response, rows = pending
        out = response.result(timeout_s=self.timeout_s)
        probs = torch.from_numpy(out["probs"].astype(np.float32))
        logits = torch.from_numpy(out["logits"].astype(np.float32))
        if probs.shape[0] != rows:
            raise RuntimeError(f"the teacher application returned {probs.shape[0]} rows for a batch of {rows}.")
        return probs, logits, float(out["latency_s"])

    def attach(self, batches: Iterable) -> Iterator:
        return self.window.attach(batches)

    def info(self) -> dict:
        """The ingress's info(): num_classes, in_chans and each teacher's name/model/input_size."""
        if self._info is None:
            self._info = self.handle.info.remote().result(timeout_s=self.timeout_s)
        return self._info

    def check_student(self, num_classes: int, in_chans: int) -> None:
        """Raise ClassCountMismatchError when the student cannot be distilled from the served teachers."""
        from meal_ray.ensemble import check_compatible

        info = self.info()
        check_compatible(info["num_classes"], {t["in_chans"] for t in info["teachers"]}, num_classes, in_chans)

    def close(self) -> None:
        self._info = None


# ----------------------------------------------------------------------------- lifecycle (CLI: meal-ray teachers)


def load_serve_config(config_path: str | Path, base_dir: Optional[str] = None):
    """Read a Serve config file (the `serve deploy` schema); resolve meal-ray apps' relative weights paths."""
    from ray.serve.schema import ServeDeploySchema

    from meal_ray.config import read_yaml

    path = Path(config_path)
    raw = read_yaml(path, "Serve config", "deployments/")
    try:
        config = ServeDeploySchema.model_validate(raw)
    except Exception as e:  # pydantic ValidationError: names the field
        raise ConfigError(f"Serve config {str(path)!r} does not follow the `serve deploy` schema: {e}") from None
    for app in config.applications:
        if app.import_path == IMPORT_PATH:
            app_args = dict(app.args or {})
            app_args["teachers"] = parse_teachers(app_args, base_dir=base_dir)  # fail fast, before Ray starts
            app_args.pop("base_dir", None)
            app.args = app_args
    return config


def _last_line(message: str) -> str:
    """Serve reports build/constructor failures as a traceback; its last line is the error."""
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _wait_running(app_names: list, timeout_s: float, log=print) -> dict:
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        status = teachers_status()
        states = {n: status.get(n, {}).get("status", "NOT_DEPLOYED") for n in app_names}
        if states != last:
            log("  " + ", ".join(f"{n}: {s}" for n, s in states.items()))
            last = states
        if all(s == "RUNNING" for s in states.values()):
            return status
        failed = {n: status[n] for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed or time.monotonic() > deadline:
            detail = "; ".join(f"{n}: {v['status']}: {_last_line(v['message'])}" for n, v in (failed or {
                n: status.get(n, {"status": states[n], "message": ""}) for n in app_names}).items())
            raise TeachersNotRunningError(
                f"the teacher application did not reach RUNNING{'' if failed else f' within {timeout_s:.0f}s'} ({detail}). "
                "See `meal-ray teachers status` / `serve status` and the replica logs.")
        time.sleep(1.0)


def teachers_up(config_path: str | Path, address: Optional[str] = None, block: Optional[bool] = None,
                num_cpus: Optional[float] = None, timeout_s: float = 600.0, log=print) -> dict:
    """Deploy the applications of a Serve config file and wait until they are RUNNING.

    Without ``address`` (and no RAY_ADDRESS, and no Ray already initialized in this process)
    Ray is started embedded here; the cluster lives as long as this process, so then
    ``block`` defaults to True: print status until Ctrl-C (or until the apps are deleted with
    ``teachers down``), then shut Serve and Ray down. With a cluster address the apps are
    deployed there and this returns. Uses Ray's own config-deploy path (what `serve run
    config.yaml` does), so the config's ``deployments:`` overrides apply exactly as with `serve deploy`.
    Applications deployed earlier from other config files are kept (`serve deploy` would remove them).
    """
    import ray

    config = load_serve_config(config_path)
    names = [app.name for app in config.applications]
    address = address or os.environ.get("RAY_ADDRESS")
    embedded = False
    if not ray.is_initialized():
        if address:
            _connect(address)
        else:
            needed = sum(_app_cpus(app) for app in config.applications)
            cpus = num_cpus or (os.cpu_count() or 1) + needed  # the machine stays free for training workers
            ray.init(num_cpus=cpus, logging_level=logging.WARNING)
            embedded = True
            gcs = ray.get_runtime_context().gcs_address
            log(f"Started embedded Ray ({cpus:g} logical CPUs) at {gcs}; it lives as long as this command.")
            log(f"  train against it with: --address {gcs}   (or RAY_ADDRESS={gcs})")
    block = embedded if block is None else block
    try:
        status = _deploy(config, names, config_path, timeout_s, log)
    except BaseException:
        if embedded:  # nothing else uses this cluster
            ray.shutdown()
        raise
    if not block:
        return status
    log("Teachers are up. Ctrl-C (or `meal-ray teachers down`) stops them.")
    try:
        while True:
            time.sleep(5.0)
            now = teachers_status()
            if not any(n in now for n in names):
                log("The teacher applications were deleted; shutting down.")
                break
            for n in names:
                if n in now and now[n]["status"] != status.get(n, {}).get("status"):
                    log(format_status({n: now[n]}))
            status = now
    except KeyboardInterrupt:
        log("Stopping the teachers ...")
    finally:
        if embedded:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    return status


def _deploy(config, names: list, config_path, timeout_s: float, log) -> dict:
    """Ray's config-deploy path (what `serve run config.yaml` does), keeping other config-deployed apps."""
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(), proxy_location=config.proxy_location,
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()))
    # Keep applications deployed earlier from other config files (a config deploy replaces the whole set).
    apps = list(config.applications)
    try:
        for name, details in client.get_serve_details().get("applications", {}).items():
            deployed = details.get("deployed_app_config")
            if deployed and name not in names:
                apps.append(ServeApplicationSchema.model_validate(deployed))
    except Exception as e:  # best effort
        log(f"(could not read the deployed applications: {e})")
    merged = config.model_dump(exclude_unset=True)
    merged["applications"] = [a.model_dump(exclude_unset=True) for a in apps]
    client.deploy_apps(ServeDeploySchema.model_validate(merged))
    log(f"Deploying {', '.join(names)} from {config_path} ...")
    status = _wait_running(names, timeout_s, log)
    for name in names:
        log(format_status({name: status[name]}))
    return status


def _app_cpus(app) -> float:
    """Logical CPUs a config's application asks for (replicas x num_cpus; autoscaling: min replicas)."""
    total = 0.0
    for d in app.deployments or []:
        opts = getattr(d, "ray_actor_options", None)
        cpus = opts.get("num_cpus") if isinstance(opts, dict) else getattr(opts, "num_cpus", None)
        cpus = 1.0 if cpus is None else float(cpus)  # Serve's default: one CPU per replica
        replicas = getattr(d, "num_replicas", None)
        if not isinstance(replicas, int):
            auto = getattr(d, "autoscaling_config", None)
            low = auto.get("min_replicas") if isinstance(auto, dict) else getattr(auto, "min_replicas", None)
            replicas = low or 1
        total += cpus * max(int(replicas), 1)
    return total


def teachers_status(address: Optional[str] = None) -> dict:
    """``{app: {"status", "message", "deployments": {name: {"status", "message", "replicas"}}}}`` of the cluster."""
    _connect(address)
    try:
        apps = serve.status().applications
    except Exception:
        return {}
    out = {}
    for name, app in apps.items():
        out[name] = {
            "status": _name(app.status), "message": app.message or "",
            "deployments": {d: {"status": _name(s.status), "message": s.message or "",
                                "replicas": {_name(k): v for k, v in (s.replica_states or {}).items()}}
                            for d, s in app.deployments.items()},
        }
    return out


def format_status(status: dict) -> str:
    if not status:
        return f"No Serve applications are running. {HOW_TO_START}"
    lines = []
    for name, app in status.items():
        lines.append(f"{name}: {app['status']}" + (f" ({app['message']})" if app["message"] else ""))
        for d, s in app["deployments"].items():
            replicas = ", ".join(f"{n} {k}" for k, n in s["replicas"].items()) or "no replicas"
            lines.append(f"  {d}: {s['status']} [{replicas}]" + (f" {s['message']}" if s["message"] else ""))
    return "\n".join(lines)


def teachers_down(target: str | Path = DEFAULT_APP_NAME, address: Optional[str] = None) -> list:
    """Delete the teacher application(s): an app name, or a Serve config file (all its applications)."""
    names = [str(target)]
    p = Path(str(target))
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"Serve config {str(p)!r} does not exist.")
        import yaml

        names = [a.get("name", "default") for a in (yaml.safe_load(p.read_text()) or {}).get("applications", [])]
    running = teachers_status(address)
    deleted = [n for n in names if n in running]
    for n in deleted:
        serve.delete(n)
    return deleted
