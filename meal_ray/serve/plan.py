"""`meal-ray plan`: how many replicas each teacher needs so a job's students never wait for soft labels.

Demand: the student's hard-label throughput per worker (measured here with the job's engine, or given) times
``run.num_workers``. Supply: one replica's crops/s per teacher (measured here on this machine's device at the job's
crop size and the app's ``max_batch_size``, taken from ``args.emulate``, or given). Each teacher deployment gets
``ceil(demand * headroom / supply)`` replicas; the headroom (default 1.25: replicas at most 80% busy) keeps the
queueing wait of the served path under a few percent (``bench/bench_served.py`` measures it).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

from meal_ray.config import JobConfig, load_app_config, read_yaml, teacher_spec
from meal_ray.errors import ConfigError
from meal_ray.files import write_text_atomic
from meal_ray.placement import POOL_LABEL, STUDENT_POOL, TEACHER_POOL
from meal_ray.serve.app import IMPORT_PATH, place_on_pool, resolve_teachers


@dataclass
class TeacherPlan:
    name: str
    model: str
    crops_per_s: float  # one replica
    source: str  # measured | emulated | given
    replicas: int
    utilization: float  # demand / (replicas * crops_per_s)

    @property
    def expected_wait(self) -> float:
        """Fraction of the student's time spent waiting if the teachers were the bottleneck (0 below capacity)."""
        return max(0.0, 1.0 - 1.0 / self.utilization) if self.utilization > 0 else 0.0


def _parse_rates(items, what: str) -> dict:
    out = {}
    for item in items or ():
        name, _, value = str(item).partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = -1.0
        if not name or rate <= 0:
            raise ConfigError(f"{what} {item!r} must look like NAME=CROPS_PER_S with a positive number, "
                              "e.g. senet154=850.")
        out[name] = rate
    return out


def meal_ray_app(serve_config: dict, path: str) -> dict:
    """The meal-ray teacher application in a Serve config dict (the only one, or the one named like the job's)."""
    apps = [a for a in serve_config.get("applications") or [] if a.get("import_path") == IMPORT_PATH]
    if len(apps) != 1:
        raise ConfigError(f"Serve config {path!r} must hold exactly one meal-ray teacher application "
                          f"(import_path: {IMPORT_PATH}); found {len(apps)}.")
    return apps[0]


def measure_teacher(spec, crop_size: int, in_chans: int, batch: int, autocast: Optional[str],
                    seconds: float = 3.0, device: str = "cpu") -> float:
    """One replica's crops/s: full forward passes (preprocessing included) of ``batch`` uint8 crops."""
    from meal_ray.ensemble import load_teacher

    teacher = load_teacher(spec, autocast).to(device)
    crops = torch.randint(0, 256, (batch, in_chans, crop_size, crop_size), dtype=torch.uint8, device=device)
    teacher(crops)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        teacher(crops)
        done += batch
    if device != "cpu":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def measure_student(cfg: JobConfig, steps: int = 20, device: str = "cpu") -> float:
    """One worker's hard-label img/s with the job's student, batch and crops (after 3 warm-up steps)."""
    import dataclasses

    from meal_ray.engine import Engine

    hard = dataclasses.replace(cfg, mode="pretrain", teachers=dataclasses.replace(cfg.teachers, source="none"))
    engine = Engine.for_job(hard, device=device, log=lambda s: None)
    engine.student.train()
    done, start = 0, None
    for i, batch in enumerate(engine.batches()):
        if i == 3:
            start, done = time.perf_counter(), 0
        engine.train_step(batch)
        done += len(batch)
        if i >= steps + 3:
            break
    if start is None:
        raise ConfigError(f"the job's training set gives fewer than {steps + 4} batches of "
                          f"{cfg.optim.batch_size // cfg.run.num_workers}: lower --steps or the batch size.")
    return done / (time.perf_counter() - start)


def plan_replicas(demand: float, rates: dict, headroom: float = 1.25, names: Optional[dict] = None,
                  sources: Optional[dict] = None) -> list:
    """Replicas per teacher so that ``demand`` crops/s (all workers) keeps every teacher at most 1/headroom busy."""
    if demand <= 0:
        raise ConfigError(f"the students' demand must be positive, got {demand} img/s.")
    if headroom < 1:
        raise ConfigError(f"--headroom={headroom} must be >= 1 (1.25: replicas at most 80% busy).")
    plans = []
    for name, rate in rates.items():
        replicas = max(1, math.ceil(demand * headroom / rate - 1e-9))
        plans.append(TeacherPlan(name, (names or {}).get(name, name), rate, (sources or {}).get(name, "given"),
                                 replicas, demand / (replicas * rate)))
    return plans


def apply_plan(serve_config: dict, path: str, plans: list, autoscale: bool = False, pools: bool = False) -> dict:
    """A copy of the Serve config with each teacher deployment's ``num_replicas`` set (or, with ``autoscale``,
    ``autoscaling_config`` from the plan to twice it) and, with ``pools``, every replica on the teacher pool's nodes;
    validated against the ``serve deploy`` schema."""
    from ray.serve.schema import ServeDeploySchema

    out = copy.deepcopy(serve_config)
    app = meal_ray_app(out, path)
    if pools:
        place_on_pool(app, {POOL_LABEL: TEACHER_POOL})
    deployments = {d["name"]: d for d in app.setdefault("deployments", [])}
    for p in plans:
        d = deployments.get(p.name)
        if d is None:
            d = {"name": p.name}
            app["deployments"].append(d)
        if autoscale:
            d.pop("num_replicas", None)
            d["autoscaling_config"] = dict(d.get("autoscaling_config") or {}, min_replicas=p.replicas,
                                           max_replicas=2 * p.replicas)
        else:
            d.pop("autoscaling_config", None)
            d["num_replicas"] = p.replicas
    try:
        ServeDeploySchema.model_validate(out)
    except Exception as e:  # pydantic ValidationError
        raise ConfigError(f"the planned Serve config does not follow the `serve deploy` schema: {e}") from None
    return out


def plan_job(cfg: JobConfig, serve_config_path: str, teacher_rates: Optional[list] = None,
             student_rate: Optional[float] = None, headroom: float = 1.25, seconds: float = 3.0,
             output: Optional[str] = None, autoscale: bool = False, log=print, pools: bool = False,
             job_config_path: Optional[str] = None, job_output: Optional[str] = None) -> dict:
    """Measure (or take) supply and demand, print the table, write the planned Serve config (and, with ``pools``,
    the job planned onto the student pool: ``<job>-planned.yaml``). Returns the plan."""
    if headroom < 1:
        raise ConfigError(f"--headroom={headroom} must be >= 1 (1.25: replicas at most 80% busy).")
    raw = read_yaml(serve_config_path, "Serve config", "deployments/")
    app_raw = meal_ray_app(raw, serve_config_path)
    app = load_app_config(app_raw.get("args"))
    given = _parse_rates(teacher_rates, "--teacher-throughput")
    specs = resolve_teachers(app, base_dir=str(Path.cwd()), check_files=False)
    unknown = set(given) - {s["name"] for s in specs}
    if unknown:
        raise ConfigError(f"--teacher-throughput names {sorted(unknown)}, which the Serve config does not deploy; "
                          f"its teachers: {', '.join(s['name'] for s in specs)}.")
    if app.emulate is None and set(given) != {s["name"] for s in specs}:
        specs = resolve_teachers(app, base_dir=str(Path.cwd()))  # teachers to time here: their weights must exist
    if student_rate is not None and student_rate <= 0:
        raise ConfigError(f"--student-throughput={student_rate} must be a positive number (img/s per worker).")
    device = "cuda" if cfg.run.use_gpu else "cpu"
    to_time = ([] if student_rate is not None else ["the student"]) + (
        [] if app.emulate is not None else [s["name"] for s in specs if s["name"] not in given])
    if device == "cuda" and to_time and not torch.cuda.is_available():
        raise ConfigError(
            f"the job trains on GPUs (run.use_gpu: true) but this machine has none, so {', '.join(to_time)} cannot be "
            "timed here: a CPU timing is no plan for a GPU cluster. Give the GPU rates (--student-throughput IMG_S "
            "per worker, --teacher-throughput NAME=CROPS_S for each teacher), or plan for CPU workers with "
            "--set run.use_gpu=false.")
    if student_rate is None:
        log(f"[plan] measuring the student ({cfg.student.model}, batch {cfg.optim.batch_size // cfg.run.num_workers} "
            f"per worker, {device}) ...")
        student_rate = measure_student(cfg, device=device)
    demand = student_rate * cfg.run.num_workers
    rates, sources = {}, {}
    for s in specs:
        if s["name"] in given:
            rates[s["name"]], sources[s["name"]] = given[s["name"]], "given"
        elif app.emulate is not None:
            rates[s["name"]], sources[s["name"]] = app.emulate.crops_per_s, "emulated"
        else:
            log(f"[plan] measuring one {s['model']} replica ({device}, batch {app.max_batch_size}) ...")
            rates[s["name"]] = measure_teacher(teacher_spec(s), cfg.data.image_size, cfg.data.in_chans,
                                               app.max_batch_size, app.autocast, seconds, device)
            sources[s["name"]] = "measured"
    plans = plan_replicas(demand, rates, headroom, {s["name"]: s["model"] for s in specs}, sources)
    planned = apply_plan(raw, serve_config_path, plans, autoscale, pools)
    out = Path(output or planned_path(serve_config_path))
    header = (f"# Planned by `meal-ray plan` for job {cfg.name!r}: {cfg.run.num_workers} worker(s) x "
              f"{student_rate:.0f} img/s = {demand:.0f} crops/s per teacher, headroom {headroom:g}\n")
    write_text_atomic(out, header + yaml.safe_dump(planned, sort_keys=False))
    log(format_plan(plans, demand, cfg.run.num_workers, student_rate))
    log(f"[plan] wrote {out} (deploy: `serve deploy {out}` or `meal-ray teachers up --config {out}`)")
    result = {"demand": demand, "student_rate": student_rate, "plans": plans, "serve_config": str(out)}
    if pools:  # the other side: the job's workers on the student pool
        job = cfg.to_dict()
        job["run"]["label_selector"] = {POOL_LABEL: STUDENT_POOL}
        job_out = Path(job_output or planned_path(job_config_path or f"{cfg.name}.yaml"))
        write_text_atomic(job_out, f"# Planned by `meal-ray plan` with the Serve config {out}: the train workers on "
                                   f"the student pool ({POOL_LABEL}={STUDENT_POOL}), the teachers on "
                                   f"{POOL_LABEL}={TEACHER_POOL}\n" + yaml.safe_dump(job, sort_keys=False))
        log(f"[plan] wrote {job_out} (run it: `meal-ray distill --config {job_out}`)")
        result["job_config"] = str(job_out)
    return result


def planned_path(path: str) -> Path:
    """``x.yaml`` -> ``x-planned.yaml`` beside it."""
    return Path(path).with_name(Path(path).stem + "-planned.yaml")


def format_plan(plans: list, demand: float, workers: int, student_rate: float) -> str:
    lines = [f"students: {workers} worker(s) x {student_rate:.0f} img/s = {demand:.0f} crops/s to every teacher", "",
             "| teacher | model | crops/s per replica | from | replicas | utilization | expected wait |",
             "|---|---|---:|---|---:|---:|---:|"]
    for p in plans:
        lines.append(f"| {p.name} | {p.model} | {p.crops_per_s:.0f} | {p.source} | {p.replicas} | "
                     f"{100 * p.utilization:.0f}% | {100 * p.expected_wait:.1f}% |")
    return "\n".join(lines)
