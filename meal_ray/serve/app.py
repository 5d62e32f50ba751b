"""The teacher application builder (``import_path: meal_ray.serve.app:build_app``) and Serve config files.

Deploy with a Serve config file (see ``deployments/``): ``meal-ray teachers up --config
deployments/fashion-mnist.yaml`` (embedded local Ray) or ``serve deploy
deployments/fashion-mnist.yaml`` on a running cluster. The ``args`` are validated by the job
config's machinery (:class:`meal_ray.config.TeacherAppConfig`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

from meal_ray.config import TeacherAppConfig, load_app_config, read_yaml
from meal_ray.errors import ConfigError, ModelNotFoundError
from meal_ray.models import check_model_name
from meal_ray.serve.deployments import INGRESS_NAME, EnsembleIngress, TeacherModel

IMPORT_PATH = "meal_ray.serve.app:build_app"


def app_base_dir(app: TeacherAppConfig, base_dir: Optional[str] = None) -> Path:
    """Where the app's relative paths (weights, ``data.root``) resolve: the given directory, else ``args.base_dir``,
    else the working directory."""
    return Path(base_dir or app.base_dir or os.getcwd())


def _resolved(path: str, base: Path) -> Path:
    """``path`` with ``~`` expanded, and relative to ``base`` unless absolute."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else base / p


def resolve_teachers(app: TeacherAppConfig, base_dir: Optional[str] = None, check_files: bool = True) -> list:
    """Teacher specs as dicts with deployment names (``teacher<i>`` by default), absolute weights paths and, as
    ``weights_given``, the weights as the config wrote them (what a job names to mean these teachers)."""
    base = app_base_dir(app, base_dir)
    specs, names = [], set()
    for i, t in enumerate(app.teachers):
        if not t.model:
            raise ConfigError(f"args.teachers[{i}] needs a timm architecture: model: resnet18.")
        check_model_name(t.model)
        name = t.name or f"teacher{i}"
        if name in names or name == INGRESS_NAME or "#" in name or "/" in name:
            raise ConfigError(f"teacher deployment name {name!r} must be unique, not {INGRESS_NAME!r}, "
                              "and contain no '#' or '/'.")
        names.add(name)
        weights = t.weights
        if weights:
            path = _resolved(weights, base)
            if check_files and not path.exists():
                hint = ""
                if "fmnist-teacher-" in str(weights):
                    job = str(weights).split("fmnist-teacher-")[1].split("/")[0]
                    hint = f" Produce it with `meal-ray pretrain --config jobs/fmnist-teacher-{job}.yaml`."
                raise ModelNotFoundError(
                    f"teacher {name!r}: weights {weights!r} not found (looked at {path}; relative paths are "
                    f"resolved against {base}).{hint} Or give an absolute path / the right working directory.")
            weights = str(path)
        specs.append({"name": name, "model": t.model, "weights": weights, "pretrained": bool(t.pretrained),
                      "weights_given": t.weights})
    return specs


def resolve_data(app: TeacherAppConfig, base_dir: Optional[str] = None) -> Optional[dict]:
    """``args.data`` with an absolute root (relative roots resolve like weights paths), or None."""
    if app.data is None:
        return None
    root = app.data.root
    return {"dataset": app.data.dataset, "root": str(_resolved(root, app_base_dir(app, base_dir))) if root else None}


def build_app(args: dict):
    """Serve application builder: one TeacherModel deployment per teacher + the EnsembleIngress.

    ``args`` (from a Serve config file or ``serve.run``): ``teachers`` (list of ``{name, model,
    weights, pretrained}``), ``max_batch_size`` (crops per forward pass), ``batch_wait_timeout_s``,
    ``autocast`` (bf16 | fp16 | null), ``base_dir`` (relative weights paths), ``retry_s``, ``data`` (``{dataset,
    root}``: the training set the replicas read to render crop-box requests), ``emulate`` (``{crops_per_s,
    overhead_ms}``: benchmark replicas that sleep as the real teachers would compute).
    Bad args are refused here, before any replica starts (so ``serve deploy`` fails fast).
    """
    app = load_app_config(args)
    specs = resolve_teachers(app)
    data = resolve_data(app)
    emulate = dataclasses.asdict(app.emulate) if app.emulate else None
    bound = [TeacherModel.options(name=s["name"]).bind(s, app.autocast, app.max_batch_size,
                                                       float(app.batch_wait_timeout_s), data, emulate) for s in specs]
    return EnsembleIngress.options(name=INGRESS_NAME).bind(bound, [s["name"] for s in specs], float(app.retry_s),
                                                           app.autocast)


def load_serve_config(config_path: str | Path, base_dir: Optional[str] = None):
    """Read a Serve config file (the `serve deploy` schema); resolve meal-ray apps' relative weights paths."""
    from ray.serve.schema import ServeDeploySchema

    path = Path(config_path)
    raw = read_yaml(path, "Serve config", "deployments/")
    try:
        config = ServeDeploySchema.model_validate(raw)
    except Exception as e:  # pydantic ValidationError: names the field
        raise ConfigError(f"Serve config {str(path)!r} does not follow the `serve deploy` schema: {e}") from None
    for app in config.applications:
        if app.import_path == IMPORT_PATH:
            app_args = dict(app.args or {})
            parsed = load_app_config(app_args)
            resolve_teachers(parsed, base_dir=base_dir)  # fail fast: names and weights files
            # relative paths keep resolving against this directory wherever the app is built, and the teachers keep
            # the names the config gives them (a job names its teachers' weights the same way)
            app_args["base_dir"] = str(app_base_dir(parsed, base_dir).resolve())
            app.args = app_args
    return config


def place_on_pool(app: dict, selector: dict) -> dict:
    """A Serve config's meal-ray application (a dict) with every teacher deployment and the ingress asking for nodes
    with ``selector`` (``ray_actor_options.label_selector``, the deployments' other options kept): its teacher pool."""
    parsed = load_app_config(app.get("args"))
    names = [t.name or f"teacher{i}" for i, t in enumerate(parsed.teachers)] + [INGRESS_NAME]
    deployments = {d["name"]: d for d in app.setdefault("deployments", [])}
    for name in names:
        d = deployments.get(name)
        if d is None:
            d = {"name": name, "ray_actor_options": {"num_cpus": 0 if name == INGRESS_NAME else 1}}
            app["deployments"].append(d)
        d["ray_actor_options"] = dict(d.get("ray_actor_options") or {}, label_selector=dict(selector))
    return app
