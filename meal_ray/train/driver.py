"""The Ray Train driver for `meal-ray pretrain` and `meal-ray distill` (Ray lives here, not in the engine).

The driver checks the job (before Ray starts), prepares the output directory, checks the
soft-label source, opens the MLflow run, and runs a ``TorchTrainer`` whose workers each hold
only the student and the discriminator (:mod:`meal_ray.train.worker`); every epoch is a Ray
Train checkpoint. It then exports the final student (timm-loadable), writes ``metrics.json``
and the plots.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from meal_ray.cluster import app_demands, check_placement, cluster_nodes, ensure_ray, placement_timed_out, user_error
from meal_ray.config import JobConfig, config_differences, load_config
from meal_ray.errors import CheckpointError, ConfigError, ModelNotFoundError, OutputDirError, PlacementError
from meal_ray.files import write_text_atomic
from meal_ray.models import check_model_name, check_weights_fit
from meal_ray.placement import POOL_LABEL, STUDENT_POOL, cpu_threads, unplaceable, worker_demand
from meal_ray.source_registry import source_class
from meal_ray.train.worker import load_state, train_loop_per_worker

RUN_FILE = "run.json"
# run settings a resumed run may change: where it logs, where it runs and on how many workers. The global batch
# stays optim.batch_size whatever the worker count, so the math is the job's; with another count the workers'
# augmentation streams cannot continue as they were (the engine says so), and the run is no longer bit for bit.
RESUMABLE_ELSEWHERE = ("tracking_uri", "log_every", "register_model", "label_selector", "accelerator_type",
                       "placement_timeout_s", "max_failures", "num_workers", "cpus_per_worker",
                       "resources_per_worker", "use_gpu")


def check_output(cfg: JobConfig, resume: bool, overwrite: bool) -> dict:
    """Refuse to mix runs in one directory (nothing is touched here); return the saved run record when resuming."""
    out = cfg.output_dir
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"the output {out} is a file, not a directory; choose another --output (run.output).")
    record_path = out / RUN_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if overwrite:
            return {}
        if resume:
            diff = config_differences(_with_defaults(record["config"]), cfg.to_dict(),
                                      ignore=["optim.epochs"] + [f"run.{k}" for k in RESUMABLE_ELSEWHERE])
            if diff:
                raise OutputDirError(
                    f"{out} holds a run with a different config ({', '.join(diff)} differ); "
                    "resume with the same config (optim.epochs may grow, and the run.* placement and worker count may "
                    "change), or use --overwrite / another --output."
                )
            return record
        raise OutputDirError(
            f"{out} already holds a run ({record.get('mode')} of {record.get('student')}); "
            "pass --resume to continue it, --overwrite to replace it, or choose another --output."
        )
    if resume:
        raise OutputDirError(f"--resume: {out} holds no run to resume; drop --resume to start one.")
    return {}


def _with_defaults(recorded: dict) -> dict:
    """A recorded config as this version writes it (keys added since then at their defaults), so that a run recorded
    by an earlier meal-ray is resumed, not refused as another config."""
    try:
        return load_config(data=recorded).to_dict()
    except ConfigError:
        return dict(recorded)


def prepare_output(cfg: JobConfig, resume: bool, overwrite: bool) -> dict:
    """:func:`check_output`, then clear the directory for ``--overwrite`` and create it (after every check passed)."""
    record = check_output(cfg, resume, overwrite)
    out = cfg.output_dir
    if overwrite and (out / RUN_FILE).is_file():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return record


def check_job(cfg: JobConfig, source=None) -> None:
    """Everything checkable on the driver before Ray starts: model names, weights files, the dataset (there, readable,
    the student's class count), the source's config. Errors here are clear messages, not worker tracebacks."""
    from meal_ray.data.datasets import load_datasets

    check_model_name(cfg.student.model)
    if cfg.student.weights and not Path(cfg.student.weights).exists():
        raise ModelNotFoundError(f"student.weights {cfg.student.weights!r} not found: give a meal-ray export "
                                 "directory or a weights file (.safetensors/.pth).")
    if cfg.student.weights:
        check_weights_fit(cfg.student.model, cfg.student.weights, cfg.student.num_classes, cfg.data.in_chans)
    load_datasets(cfg.data, cfg.student.num_classes)
    (source or source_class(cfg.teachers.source)).check_config(cfg)


def input_digests(cfg: JobConfig, served: Optional[dict] = None) -> dict:
    """sha256 of every weights file the job starts from (student init, teachers), by config key: a config names
    files by path, so two runs of one config can start from different weights; run.json keeps what this one read.
    Served teachers are described by the application (``served``: what the served source's preflight returned, the
    digests its replicas computed); only without that are the files hashed here, where they exist."""
    from meal_ray.ensemble import file_sha256, weights_file

    specs = [("student.weights", cfg.student)]
    if cfg.teachers.source in ("local", "served"):
        specs += [(f"teachers.models.{i}.weights", t) for i, t in enumerate(cfg.teachers.models)]
    described = {f"teachers.models.{i}.weights": t.get("weights", "")
                 for i, t in enumerate(((served or {}).get("teacher_set") or {}).get("teachers") or [])}
    out = {}
    for key, spec in specs:
        if str(described.get(key, "")).startswith("sha256:"):
            out[key] = described[key].split(":", 1)[1]
            continue
        path = weights_file(spec)
        if path is not None and path.is_file() and not (served and key in described):
            out[key] = file_sha256(path)
    return out


def check_job_placement(cfg: JobConfig, log=print) -> None:
    """The job's train workers (and, for served teachers, the application's replicas) fit on the cluster's nodes:
    otherwise a PlacementError names the missing label, resource or node count before anything starts."""
    demands = [worker_demand(cfg.run)]
    if cfg.teachers.source == "served":
        demands += app_demands(cfg.teachers.app_name)
    check_placement(
        demands, f"job {cfg.name!r} ({cfg.run.num_workers} train worker(s)"
        + (f" beside the teachers of {cfg.teachers.app_name!r})" if cfg.teachers.source == "served" else ")"),
        "Add nodes that offer it (e.g. `ray start --address <head> --num-cpus N "
        f"--labels {POOL_LABEL}={STUDENT_POOL}` for train workers), or ask for less: run.num_workers, "
        "run.cpus_per_worker, run.resources_per_worker, run.accelerator_type, run.label_selector (and the Serve "
        "config's ray_actor_options for the teachers).", cfg.run.placement_timeout_s, log)


def tracking_tags(cfg: JobConfig, served: Optional[dict] = None) -> dict:
    """What a run is, as MLflow tags a person filters on: mode, student, dataset, the teacher set (for served teachers
    also the fingerprint of what the application serves)."""
    tags = {"meal_ray.mode": cfg.mode, "meal_ray.student": cfg.student.model, "meal_ray.dataset": dataset_name(cfg),
            "meal_ray.teacher_source": cfg.teachers.source}
    if cfg.teachers.source != "none":
        tags["meal_ray.teachers"] = ", ".join(t.model for t in cfg.teachers.models)
        tags["meal_ray.teacher_weights"] = ", ".join(str(t.weights or "hub") for t in cfg.teachers.models)
    if (served or {}).get("teacher_set"):
        tags["meal_ray.teacher_set_fingerprint"] = served["teacher_set"]["fingerprint"]
    return tags


def dataset_name(cfg: JobConfig) -> str:
    d = cfg.data
    return d.dataset if d.dataset != "imagefolder" else f"imagefolder:{Path(d.root or '.').resolve().name}"


def tracking_datasets(cfg: JobConfig) -> list:
    """The training and evaluation data as MLflow run inputs (name, source, subset; digest over what selects it)."""
    from meal_ray.tracking import dataset_input

    d = cfg.data
    source = str(Path(d.root).resolve()) if d.root else d.dataset
    out = []
    for split, subset, context in (("train", d.train_subset, "training"), ("val", d.val_subset, "evaluation")):
        select = {"dataset": d.dataset, "root": source, "split": split, "subset": subset, "seed": cfg.run.seed}
        out.append(dataset_input(f"{dataset_name(cfg)}/{split}", source, context, select,
                                 {"split": split, "subset": subset or "all", "num_classes": cfg.student.num_classes,
                                  "image_size": d.image_size}))
    return out


def run_job(cfg: JobConfig, *, resume: bool = False, overwrite: bool = False, address: Optional[str] = None,
            log=print, parent_run_id: Optional[str] = None, tags: Optional[dict] = None,
            progress_suffix: Callable[[Optional[float]], str] = lambda eta_s: "") -> dict:
    """Run a pretrain or distill job end to end and return the final metrics record. ``parent_run_id`` nests the
    MLflow run under that run (the demo's stages); ``tags`` are added to the run's. While it trains, a live progress
    line (``progress_suffix(stage ETA)`` appended: the demo's whole-demo ETA) and rank 0's log lines are shown
    through ``log``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from meal_ray.progress import PROGRESS_FILE, ProgressView
    from meal_ray.tracking import Tracker, default_tracking_uri

    source = source_class(cfg.teachers.source)
    check_job(cfg, source)  # before Ray starts: names, files, config
    check_output(cfg, resume, overwrite)
    needed = cfg.run.num_workers * cfg.run.worker_resources().get("CPU", 1) + 1
    ensure_ray(address, num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)))
    check_job_placement(cfg, log)  # the workers (and the served teachers) fit on the nodes: never a silent wait
    served = source.preflight(cfg) or {}  # e.g. the served teachers run, speak our protocol, are the job's teachers
    record = prepare_output(cfg, resume, overwrite)  # only now is anything on disk touched
    out = cfg.output_dir
    uri = cfg.run.tracking_uri or default_tracking_uri()
    tracker = Tracker(uri, record.get("mlflow_run_id"), log=log, spool_dir=out)
    run_tags = dict(tracking_tags(cfg, served), **(tags or {}))
    run_id = tracker.start(cfg.run.experiment, cfg.name, cfg.to_dict(), tags=run_tags,
                           parent_run_id=parent_run_id, datasets=tracking_datasets(cfg))
    record = {"name": cfg.name, "mode": cfg.mode, "student": cfg.student.model, "config": cfg.to_dict(),
              "inputs": input_digests(cfg, served), "mlflow_run_id": run_id, "tracking_uri": uri,
              "started": record.get("started", time.time())}
    if served.get("teacher_set"):
        record["served_teacher_set"] = served["teacher_set"]
    _write_json(out / RUN_FILE, record)
    config_path = out / "config.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tracker.log_artifact(config_path)

    resources = {k: v for k, v in cfg.run.worker_resources().items() if not k.startswith("accelerator_type:")}
    # Ray Train waits this long for its workers' nodes (at the start, and after a node loss), then fails the run
    # instead of waiting forever (controller_failure_limit=0: no second wait)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = f"{cfg.run.placement_timeout_s:g}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "output_dir": str(out), "threads": cpu_threads(resources)},
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker=resources, accelerator_type=cfg.run.accelerator_type,
                                     label_selector=dict(cfg.run.label_selector) or None),
        run_config=RunConfig(
            name="train", storage_path=str(out / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures, controller_failure_limit=0),
        ),
    )
    log(f"[meal-ray] {cfg.mode} {cfg.student.model}: {cfg.run.num_workers} worker(s), {cfg.optim.epochs} epochs, "
        f"output {out}, MLflow run {run_id} at {uri}")
    (out / PROGRESS_FILE).unlink(missing_ok=True)  # a previous attempt's lines are not this one's
    try:
        with ProgressView(out / PROGRESS_FILE, print_line=log, suffix=progress_suffix, label=f"{cfg.mode} {cfg.name}",
                          on_metrics=lambda m: tracker.log_metrics(m, step=m["epoch"])):
            result = trainer.fit()
    except BaseException as e:
        tracker.end("FAILED")
        error = user_error(e)  # a worker's own message (named problem and fix), not Ray's traceback
        if error is None and placement_timed_out(e):
            error = _placement_failure(cfg)
        if error is None:
            raise
        kept = sorted(p.name for p in (out / "ray" / "train").glob("checkpoint_*") if p.is_dir())
        if kept and not isinstance(error, CheckpointError):  # unreadable checkpoints: resuming is no fix
            error.args = (f"{error}\n[the run's checkpoints are kept, newest {kept[-1]}: fix the cause and run the "
                          "same command with --resume]",)
        raise error from None
    return finish(cfg, result.checkpoint, tracker, log)


def _placement_failure(cfg: JobConfig) -> PlacementError:
    """Ray Train gave up waiting for nodes for the workers (run.placement_timeout_s): say what the cluster lacks."""
    problems = unplaceable([worker_demand(cfg.run)], cluster_nodes())
    why = ("; ".join(problems) if problems else
           "the nodes that could hold them stayed busy (other jobs' workers or actors hold their resources)")
    return PlacementError(f"the {cfg.run.num_workers} train worker(s) could not be placed within "
                          f"run.placement_timeout_s={cfg.run.placement_timeout_s:g} s: {why}. Add nodes for them "
                          f"(e.g. `ray start --address <head> --labels {POOL_LABEL}={STUDENT_POOL}`) or free them")


def finish(cfg: JobConfig, checkpoint, tracker, log=print) -> dict:
    """Export the final student, write metrics.json and plots, and attach them to the MLflow run."""
    from meal_ray.engine import build_student, student_data_config
    from meal_ray.models import export_model
    from meal_ray.plots import plot_per_class, plot_training_curves
    from meal_ray.tracking import ui_hint

    out = cfg.output_dir
    if checkpoint is None:
        raise ConfigError("training produced no checkpoint (optim.epochs already reached?)")
    with checkpoint.as_directory() as d:
        state = load_state(Path(d))
    student = build_student(load_config(data=dict(cfg.to_dict(), student=dict(cfg.to_dict()["student"], weights=None,
                                                                                pretrained=False))))
    student.load_state_dict(state["student"])
    val = state["val"]
    classes = list(val["per_class"].keys())
    export_model(student.eval(), out / "student", student_data_config(cfg), label_names=classes)
    metrics = {"top1": val["top1"], "top5": val["top5"], "nll": val.get("nll"), "ece": val.get("ece"),
               "per_class": val["per_class"], "epochs": state["epoch"],
               "count": val["count"], "history": state["history"], "mlflow_run_id": tracker.run_id}
    _write_json(out / "metrics.json", metrics)
    plots = [plot_training_curves(state["history"], out / "training_curves.png", f"{cfg.mode}: {cfg.student.model}"),
             plot_per_class(classes, {cfg.student.model: list(val["per_class"].values())}, out / "per_class.png")]
    tracker.log_metrics({f"val_acc/{c.replace('/', '-')}": a for c, a in val["per_class"].items()}, step=state["epoch"])
    tracker.log_metrics({"final_top1": val["top1"], "final_top5": val["top5"], "final_nll": val.get("nll", 0.0),
                         "final_ece": val.get("ece", 0.0)}, step=state["epoch"])
    for p in plots + [out / "metrics.json"]:
        tracker.log_artifact(p)
    tracker.log_artifact(out / "student", "student")
    info = tracker.log_model(out / "student", cfg.run.register_model and str(cfg.run.register_model),
                             step=state["epoch"])
    if info is not None:
        metrics.update(mlflow_model_uri=info.model_uri, registered_model=cfg.run.register_model,
                       registered_model_version=info.registered_model_version)
        _write_json(out / "metrics.json", metrics)
    tracker.end("FINISHED")
    log(f"[meal-ray] done: top-1 {val['top1']:.2f}%  top-5 {val['top5']:.2f}%  student export {out / 'student'}")
    if info is not None:
        registered = (f"; registered as {cfg.run.register_model} version {info.registered_model_version}"
                      if info.registered_model_version else "")
        log(f"[meal-ray] MLflow model {info.model_uri} (mlflow.pytorch.load_model){registered}")
    url = tracker.url()
    if url:
        log(f"[meal-ray] MLflow run: {url}{ui_hint(tracker.uri)}")
    return metrics


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))
