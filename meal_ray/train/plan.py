"""`meal-ray plan`: how many replicas each teacher needs so a job's students never wait for soft labels, and what
the job costs run three ways.

Demand: the student's hard-label throughput per worker times ``run.num_workers``. Supply: one replica's crops/s per
teacher at its own input size and the app's precision. Each rate comes from, in this order: the command line, the
app's ``args.emulate`` (teachers), a rates file measured on a GPU (``--rates``, ``bench/gpu_check.py``), the table
shipped with meal-ray (GPU jobs: ``gpu_rates.yaml``), else timing here (the job's engine; one replica at the app's
``max_batch_size``), which a GPU job never does on a machine without a GPU. Each teacher deployment gets
``ceil(demand * headroom / supply)`` replicas; the headroom (default 1.25: replicas at most 80% busy) keeps the
queueing wait of the served path under a few percent (``bench/bench_served.py`` measures it).

From the same rates, the bill (:func:`job_costs`): the authors' way (every student GPU also runs every teacher),
served as planned, and relabel once into a soft-label cache then distil from it.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from meal_ray.config import JobConfig, load_app_config, read_yaml, teacher_spec
from meal_ray.data.datasets import FASHION_MNIST_TRAIN_SIZE
from meal_ray.errors import ConfigError
from meal_ray.files import write_text_atomic
from meal_ray.placement import POOL_LABEL, STUDENT_POOL, TEACHER_POOL
from meal_ray.progress import format_duration
from meal_ray.serve.app import IMPORT_PATH, place_on_pool, resolve_teachers
from meal_ray.serve.rates import Rate, RateTable, read_rates_file, shipped_table

DEFAULT_PASSES = 1  # relabel once (one pass of crops, replayed every epoch): the cheapest cache; see job_costs
IMAGENET_TRAIN_IMAGES = 1_281_167


@dataclass
class TeacherPlan:
    name: str
    model: str
    crops_per_s: float  # one replica
    source: str  # given | emulated | rates file | table | measured
    replicas: int
    utilization: float  # demand / (replicas * crops_per_s)


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


def _ignore_progress(seconds_left: float) -> None:
    pass


class TimingProgress:
    """What is being timed on this machine, k of n, and an ETA, so a slow timing is never silent (a 154-layer teacher
    at batch 256 on a CPU takes minutes per forward pass). The measurers report their own seconds left."""

    def __init__(self, total: int, log=print, every_s: float = 15.0, clock: Callable[[], float] = time.perf_counter):
        self.total, self.log, self.every_s, self.clock = total, log, every_s, clock
        self.done, self.spent = 0, 0.0  # items finished, their seconds
        self._start, self._said = 0.0, None

    def begin(self, what: str) -> None:
        self._start, self._said = self.clock(), None
        self.log(f"[plan] timing {self.done + 1}/{self.total}: {what} ...")

    def left(self, seconds: float) -> None:
        """The current item's seconds still to go; printed at once the first time, then every ``every_s``."""
        now = self.clock()
        if self._said is not None and now - self._said < self.every_s:
            return
        self._said = now
        rest = self.total - self.done - 1
        # the items not started yet at the mean pace so far, this one counted at its own estimate
        per_item = (self.spent + now - self._start + seconds) / (self.done + 1)
        tail = f", ~{format_duration(seconds + rest * per_item)} for all {rest + 1} left" if rest else ""
        self.log(f"[plan]   {self.done + 1}/{self.total}: ~{format_duration(seconds)} to go for this one{tail}")

    def end(self, result: str) -> None:
        took = self.clock() - self._start
        self.done, self.spent = self.done + 1, self.spent + took
        rest = self.total - self.done
        tail = f"; ~{format_duration(rest * self.spent / self.done)} left for the other {rest}" if rest else ""
        self.log(f"[plan]   {self.done}/{self.total} done in {format_duration(took)}: {result}{tail}")


def measure_teacher(spec, crop_size: int, in_chans: int, batch: int, autocast: Optional[str],
                    seconds: float = 3.0, device: str = "cpu",
                    progress: Callable[[float], None] = _ignore_progress) -> float:
    """One replica's crops/s: full forward passes (preprocessing included) of ``batch`` uint8 crops, for ``seconds``
    and at least one batch after a warm-up batch; ``progress`` gets the seconds left after every batch."""
    from meal_ray.ensemble import load_teacher

    teacher = load_teacher(spec, autocast).to(device)
    crops = torch.randint(0, 256, (batch, in_chans, crop_size, crop_size), dtype=torch.uint8, device=device)
    start = time.perf_counter()
    teacher(crops)  # warm-up
    if device != "cpu":
        torch.cuda.synchronize()
    per_batch = time.perf_counter() - start
    progress(max(seconds, per_batch))
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        teacher(crops)
        done += batch
        elapsed = time.perf_counter() - start
        progress(max(0.0, seconds - elapsed) if elapsed < seconds else 0.0)
    if device != "cpu":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def one_worker_job(cfg: JobConfig, hard: bool = True) -> JobConfig:
    """The job as one of its train workers runs it: the per-worker batch (``optim.batch_size / run.num_workers``) on
    one worker, with hard labels unless ``hard`` is False. An engine outside Ray Train sees a world of one, so the job
    as written would train at the global batch."""
    import dataclasses

    per_worker = cfg.optim.batch_size // cfg.run.num_workers
    job = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, batch_size=per_worker),
                              run=dataclasses.replace(cfg.run, num_workers=1))
    if hard:
        job = dataclasses.replace(job, mode="pretrain", teachers=dataclasses.replace(cfg.teachers, source="none"))
    return job


def measure_student(cfg: JobConfig, steps: int = 20, device: str = "cpu",
                    progress: Callable[[float], None] = _ignore_progress, source=None) -> float:
    """One worker's img/s with the job's student, per-worker batch and crops (after 3 warm-up steps): hard labels, or
    MEAL V2's whole step with soft labels from ``source`` (the served teachers: ``bench/gpu_check.py``; the caller
    closes it). ``progress`` gets the seconds left after every step."""
    from meal_ray.engine import Engine

    job = one_worker_job(cfg, hard=source is None)
    engine = Engine.for_job(job, source=source, device=device, log=lambda s: None)
    engine.student.train()
    if engine.discriminator is not None:
        engine.discriminator.train()
    done, start, began = 0, None, time.perf_counter()
    for i, batch in enumerate(engine.source.attach(engine.batches())):
        if i == 3:
            start, done = time.perf_counter(), 0
        engine.train_step(batch)
        done += len(batch)
        progress((time.perf_counter() - began) / (i + 1) * (steps + 3 - i))
        if i >= steps + 3:
            break
    if start is None:
        raise ConfigError(f"the job's training set gives fewer than {steps + 4} batches of "
                          f"{job.optim.batch_size}: lower --steps or the batch size.")
    if device != "cpu":
        torch.cuda.synchronize()
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


def check_ceiling(ceiling: float, name: str = "the served path's ceiling") -> None:
    if not 0 < ceiling <= 1.5:
        raise ConfigError(f"{name}={ceiling}: the served path's ceiling is a ratio of img/s in (0, 1.5] (served "
                          "img/s from teachers that answer at once / hard-label img/s; 1 when not measured).")


def predict_served(demand: float, plans: list, ceiling: float = 1.0) -> tuple[float, dict]:
    """The planner's model of a served run with these replica counts: the students go at their served-path pace
    (``demand`` img/s, all workers, at hard labels, times ``ceiling``: the served client's own cost on the students'
    cores, measured as served img/s from teachers that answer at once over hard-label img/s; 1 where nothing is
    measured) unless a teacher's replicas answer fewer crops/s, then at the slowest teacher's capacity; each teacher
    is busy that pace over its capacity. (``bench/bench_plan_model.py`` checks it.)"""
    check_ceiling(ceiling)
    pace = min([demand * ceiling] + [p.replicas * p.crops_per_s for p in plans])
    return pace, {p.name: pace / (p.replicas * p.crops_per_s) for p in plans}


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


def teacher_input_size(spec: dict, crop_size: int) -> int:
    """The side a teacher's forward pass runs at: its own data config's (a replica resizes the student's crop to it),
    or the job's crop size when that config is in weights not on this machine."""
    from meal_ray.ensemble import teacher_data_config

    if spec.get("weights") and not Path(spec["weights"]).exists():
        return crop_size
    return int(teacher_data_config(teacher_spec(spec))["input_size"][-1])


def known_rates(cfg: JobConfig, app, specs: list, sizes: dict, given: dict, student_rate: Optional[float],
                tables: list) -> tuple:
    """(student rate, {teacher name: rate}) for what needs no timing, by precedence: the command line, the app's
    emulated rate (teachers), then each of ``tables`` in order (a rates file, the shipped table); None where none
    has it."""
    def first(lookups):
        return next((r for r in lookups if r is not None), None)

    precision = (cfg.run.amp or "fp32") if cfg.run.use_gpu else "fp32"  # the engine trains fp32 on a CPU
    student = (Rate(student_rate, "given") if student_rate is not None else
               first(t.student(cfg.student.model, cfg.data.image_size, precision) for t in tables))
    teachers = {}
    for s in specs:
        name = s["name"]
        if name in given:
            teachers[name] = Rate(given[name], "given")
        elif app.emulate is not None:
            teachers[name] = Rate(app.emulate.crops_per_s, "emulated")
        else:
            teachers[name] = first(t.teacher(s["model"], sizes[name], app.autocast or "fp32") for t in tables)
    return student, teachers


def training_images(cfg: JobConfig, given: Optional[int]) -> Optional[int]:
    """Images per epoch: given, else what the job says without reading its data (``data.train_subset``, or
    Fashion-MNIST's training set); an image folder is not counted here (None)."""
    if given is not None:
        return given
    if cfg.data.dataset == "fashion-mnist":
        return min(cfg.data.train_subset or FASHION_MNIST_TRAIN_SIZE, FASHION_MNIST_TRAIN_SIZE)
    return cfg.data.train_subset


def plan_job(cfg: JobConfig, serve_config_path: str, *, teacher_rates: Optional[list] = None,
             student_rate: Optional[float] = None, headroom: float = 1.25, seconds: float = 3.0,
             output: Optional[str] = None, autoscale: bool = False, log=print, pools: bool = False,
             job_config_path: Optional[str] = None, job_output: Optional[str] = None,
             rates_file: Optional[str] = None, time_here: bool = False, train_images: Optional[int] = None,
             passes: int = DEFAULT_PASSES, served_ceiling: float = 1.0) -> dict:
    """Take (or measure) supply and demand, print the replica table and the job's bill three ways, write the planned
    Serve config (and, with ``pools``, the job planned onto the student pool: ``<job>-planned.yaml``). Returns the
    plan. ``served_ceiling`` (:func:`predict_served`) is the students' served pace over their hard-label pace with
    teachers that answer at once: the replicas are sized for, and the served way billed at, that pace."""
    _check_plan_options(headroom=headroom, passes=passes, served_ceiling=served_ceiling, train_images=train_images,
                        student_rate=student_rate)
    raw = read_yaml(serve_config_path, "Serve config", "deployments/")
    app_raw = meal_ray_app(raw, serve_config_path)
    app = load_app_config(app_raw.get("args"))
    given = _parse_rates(teacher_rates, "--teacher-throughput")
    specs = resolve_teachers(app, base_dir=str(Path.cwd()), check_files=False)
    unknown = set(given) - {s["name"] for s in specs}
    if unknown:
        raise ConfigError(f"--teacher-throughput names {sorted(unknown)}, which the Serve config does not deploy; "
                          f"its teachers: {', '.join(s['name'] for s in specs)}.")
    device = "cuda" if cfg.run.use_gpu else "cpu"
    tables = ([read_rates_file(rates_file)] if rates_file else []) + (
        [shipped_table()] if cfg.run.use_gpu and not time_here else [])  # the shipped figures are GPU figures
    sizes = {s["name"]: teacher_input_size(s, cfg.data.image_size) for s in specs}
    student, teachers = known_rates(cfg, app, specs, sizes, given, student_rate, tables)
    to_time = (["the student"] if student is None else []) + [n for n, r in teachers.items() if r is None]
    if device == "cuda" and to_time and not torch.cuda.is_available():
        shipped = "" if time_here else (
            f"; the table shipped with meal-ray has {table_coverage(shipped_table())}, and "
            f"{'no rates file was given' if not rates_file else 'the rates file has none for them either'}")
        raise ConfigError(
            f"the job trains on GPUs (run.use_gpu: true) but this machine has none, so {', '.join(to_time)} cannot be "
            f"timed here: a CPU timing is no plan for a GPU cluster{shipped}. Give the GPU rates "
            "(--student-throughput IMG_S per worker, --teacher-throughput NAME=CROPS_S for each teacher), measure "
            "them on a GPU with bench/gpu_check.py and pass --rates FILE, or plan for CPU workers with "
            "--set run.use_gpu=false.")
    if any(r is None for r in teachers.values()):
        specs = resolve_teachers(app, base_dir=str(Path.cwd()))  # teachers to time here: their weights must exist
    student = _time_missing_rates(cfg, app, specs, student, teachers, device=device, seconds=seconds,
                                  progress=TimingProgress(len(to_time), log))
    log(describe_rates(cfg, app, specs, sizes, student, teachers))
    for table in tables:
        for run in table.served_for(cfg.student.model, cfg.data.image_size):
            log(f"  measured on {table.device} ({table.where}): the student on served teachers sharing that one "
                f"device {run.get('samples_per_s')} img/s, hard labels {run.get('hard_samples_per_s')}; the authors' "
                f"way on one device from that file's figures {run.get('authors_one_device_samples_per_s')}")
    demand = student.value * cfg.run.num_workers * served_ceiling
    plans = plan_replicas(demand, {n: r.value for n, r in teachers.items()}, headroom,
                          {s["name"]: s["model"] for s in specs}, {n: r.source for n, r in teachers.items()})
    planned = apply_plan(raw, serve_config_path, plans, autoscale, pools)
    out = Path(output or planned_path(serve_config_path))
    header = (f"# Planned by `meal-ray plan` for job {cfg.name!r}: {cfg.run.num_workers} worker(s) x "
              f"{student.value:.0f} img/s{_times(served_ceiling)} = {demand:.0f} crops/s per teacher, "
              f"headroom {headroom:g}\n")
    write_text_atomic(out, header + yaml.safe_dump(planned, sort_keys=False))
    log(format_plan(plans, demand, cfg.run.num_workers, student.value, served_ceiling))
    log(f"[plan] wrote {out} (deploy: `serve deploy {out}` or `meal-ray teachers up --config {out}`)")
    result = {"demand": demand, "student_rate": student.value, "plans": plans, "serve_config": str(out),
              "rates": {"student": student, "teachers": teachers}, "costs": None}
    images = training_images(cfg, train_images)
    unit = "GPU" if cfg.run.use_gpu else "worker"
    if images is None:
        log(f"[plan] the bill needs the training set's size: give --train-images N (ImageNet-1k: "
            f"{IMAGENET_TRAIN_IMAGES}); an image folder is not counted here.")
    else:
        result["costs"] = job_costs(images, cfg.optim.epochs, cfg.run.num_workers, student.value, plans, passes, unit,
                                    served_ceiling)
        log(format_bill(result["costs"]))
    if pools:  # the other side: the job's workers on the student pool
        result["job_config"] = _write_planned_job(cfg, out, Path(job_output or planned_path(
            job_config_path or f"{cfg.name}.yaml")), log)
    return result


def _check_plan_options(*, headroom: float, passes: int, served_ceiling: float, train_images: Optional[int],
                        student_rate: Optional[float]) -> None:
    """The plan's own options, refused by name before anything is read or timed."""
    if headroom < 1:
        raise ConfigError(f"--headroom={headroom} must be >= 1 (1.25: replicas at most 80% busy).")
    if passes < 1:
        raise ConfigError(f"--passes={passes} must be >= 1 (passes of crops relabelled into the cache).")
    check_ceiling(served_ceiling, "--served-ceiling")
    if train_images is not None and train_images < 1:
        raise ConfigError(f"--train-images={train_images} must be >= 1 (ImageNet-1k: {IMAGENET_TRAIN_IMAGES}).")
    if student_rate is not None and student_rate <= 0:
        raise ConfigError(f"--student-throughput={student_rate} must be a positive number (img/s per worker).")


def _time_missing_rates(cfg: JobConfig, app, specs: list, student: Optional[Rate], teachers: dict, *, device: str,
                        seconds: float, progress: TimingProgress) -> Rate:
    """Time here what no option or rate table gave: the student (returned) and each teacher whose rate is None (filled
    into ``teachers``)."""
    if student is None:
        batch = cfg.optim.batch_size // cfg.run.num_workers
        progress.begin(f"the student {cfg.student.model} ({device}, batch {batch} per worker): 24 training steps")
        value = measure_student(cfg, device=device, progress=progress.left)
        progress.end(f"{value:.0f} img/s")
        student = Rate(value, "measured", f"this machine's {device}, batch {batch}")
    for s in specs:
        if teachers[s["name"]] is None:
            progress.begin(f"one {s['model']} replica ({device}, batch {app.max_batch_size}): a warm-up batch, then "
                           f"{seconds:g} s and at least one batch")
            value = measure_teacher(teacher_spec(s), cfg.data.image_size, cfg.data.in_chans, app.max_batch_size,
                                    app.autocast, seconds, device, progress.left)
            progress.end(f"{value:.0f} crops/s")
            teachers[s["name"]] = Rate(value, "measured", f"this machine's {device}, batch {app.max_batch_size}")
    return student


def _write_planned_job(cfg: JobConfig, serve_config: Path, job_out: Path, log) -> str:
    """The job with its train workers on the student pool, beside the planned Serve config; returns its path."""
    job = cfg.to_dict()
    job["run"]["label_selector"] = {POOL_LABEL: STUDENT_POOL}
    write_text_atomic(job_out, f"# Planned by `meal-ray plan` with the Serve config {serve_config}: the train workers "
                               f"on the student pool ({POOL_LABEL}={STUDENT_POOL}), the teachers on "
                               f"{POOL_LABEL}={TEACHER_POOL}\n" + yaml.safe_dump(job, sort_keys=False))
    log(f"[plan] wrote {job_out} (run it: `meal-ray distill --config {job_out}`)")
    return str(job_out)


def table_coverage(table: RateTable) -> str:
    """What a rate table holds, for a message: its device and its figures."""
    def listed(entries):
        return ", ".join(f"{e['model']} at {e['img_size']} px" for e in entries)

    return (f"{table.device} figures for the teachers {listed(table.teachers)} and the students "
            f"{listed(table.students)}")


def describe_rates(cfg: JobConfig, app, specs: list, sizes: dict, student: Rate, teachers: dict) -> str:
    """Every rate the plan uses and where it comes from; a note where a figure's precision is not the job's."""
    unit = "GPU" if cfg.run.use_gpu else "worker"
    student_precision = (cfg.run.amp or "fp32") if cfg.run.use_gpu else "fp32"

    def origin(r: Rate) -> str:
        return r.source + (f": {r.detail}" if r.detail else "")

    lines = [f"rates per {unit} (one train worker's hard-label img/s, one teacher replica's crops/s):",
             f"  student {cfg.student.model} at {cfg.data.image_size} px: {student.value:.0f} img/s "
             f"({origin(student)})"]
    lines += [f"  teacher {s['name']} ({s['model']} at {sizes[s['name']]} px): {teachers[s['name']].value:.0f} "
              f"crops/s ({origin(teachers[s['name']])})" for s in specs]
    rated = [("the student", student, student_precision, "run.amp")] + [
        (s["name"], teachers[s["name"]], app.autocast or "fp32", "args.autocast") for s in specs]
    if any(r.source == "table" for _, r, _, _ in rated):
        where = ("this machine has no GPU, so" if not torch.cuda.is_available() else
                 "--time-here times this machine's GPU instead;")
        lines.append(f"  ({where} figures marked table come from the table shipped with meal-ray: "
                     f"{shipped_table().device}, timm's published benchmarks)")
    other = [f"{who} {r.precision}{' AMP' if r.source == 'table' else ''} (runs {wanted}: {key})"
             for who, r, wanted, key in rated if r.precision and r.precision != wanted]
    if other:
        lines.append(f"  note: figures at another precision than the job's: {', '.join(other)}. On one GPU fp32 is "
                     "the slower, so the hours below are too few for an fp32 job (replicas follow the ratio of the "
                     "figures); measure its precision with bench/gpu_check.py (--rates FILE) or run it in bf16.")
    return "\n".join(lines)


@dataclass
class WayCost:
    """One way of running a job: the devices it holds, its wall time and device-hours, and where the time goes."""

    way: str
    teacher_devices: int
    student_devices: int
    wall_h: float
    device_h: float
    where: str


@dataclass
class JobBill:
    """A job run three ways (:func:`job_costs`), and up to how many cache passes the cache is the cheaper."""

    images: int  # per epoch
    epochs: int
    passes: int
    unit: str  # GPU | worker
    ways: list
    break_even_passes: float  # relabelling this many passes costs as many device-hours as serving


def job_costs(images: int, epochs: int, workers: int, student_rate: float, plans: list, passes: int = DEFAULT_PASSES,
              unit: str = "GPU", served_ceiling: float = 1.0) -> JobBill:
    """The job (``epochs`` x ``images``) run three ways from the same per-device rates, every device busy from start
    to end (data loading, start-up and evaluation left out):

    - the authors': each of the ``workers`` student devices also runs every teacher on its own batch, so a device's
      img/s is ``1 / (1/student + sum_t 1/teacher_t)``;
    - served: the students at their hard-label pace (times ``served_ceiling``) beside the planned replicas (one
      device each);
    - cache: ``passes`` passes of crops relabelled on ``workers`` devices (each runs every teacher on its crops: the
      teachers' forward passes only; `meal-ray relabel` runs ``run.num_workers`` actors), then distilled at the
      hard-label pace.
    """
    hour = 3600.0
    teacher_s = sum(1.0 / p.crops_per_s for p in plans)  # one crop through every teacher, on one device
    student_s = 1.0 / student_rate
    total = epochs * images
    authors_wall = total * (student_s + teacher_s) / workers
    student_wall = total * student_s / workers  # the cache's distillation
    served_wall = student_wall / served_ceiling
    replicas = sum(p.replicas for p in plans)
    busy = workers * student_rate * served_ceiling * teacher_s / replicas  # the replicas' mean utilization
    relabel_wall = passes * images * teacher_s / workers
    each = ", ".join(f"{p.name} {100 * p.utilization:.0f}%" for p in plans)
    ways = [
        WayCost(f"authors' (every student {unit} runs every teacher)", 0, workers, authors_wall / hour,
                workers * authors_wall / hour,
                f"teacher forwards take {100 * teacher_s / (student_s + teacher_s):.0f}% of each {unit}'s time"),
        WayCost("served (the replicas planned above)", replicas, workers, served_wall / hour,
                (workers + replicas) * served_wall / hour, f"teachers {100 * busy:.0f}% busy ({each})"
                + (f"; students at {served_ceiling:g}x their hard-label pace" if served_ceiling != 1 else "")),
        WayCost(f"cache ({passes} pass{'es' if passes > 1 else ''} relabelled, then distilled)", workers, workers,
                (relabel_wall + student_wall) / hour, workers * (relabel_wall + student_wall) / hour,
                f"relabel {_hours(relabel_wall / hour)} h, then distil {_hours(student_wall / hour)} h"),
    ]
    # passes at which the cache's hours (relabel + distil) reach the served way's; with the ceiling at 1, served
    # minus distilling = the replicas' hours = epochs / busy passes of relabelling
    break_even = epochs * student_s * ((workers + replicas) / served_ceiling - workers) / (workers * teacher_s)
    return JobBill(images, epochs, passes, unit, ways, break_even)


def _hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 100 else f"{h:.1f}" if h >= 1 else f"{h:.2g}" if h >= 0.001 else "<0.001"


def format_bill(bill: JobBill) -> str:
    unit = bill.unit
    lines = ["", f"the job: {bill.epochs} epochs x {bill.images:,} images = {bill.epochs * bill.images:,} images, "
             f"run three ways (every {unit} busy from start to end):", "",
             f"| way | teacher {unit}s | student {unit}s | wall time (h) | {unit}-hours | where the time goes |",
             "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {w.way} | {w.teacher_devices} | {w.student_devices} | {_hours(w.wall_h)} | {_hours(w.device_h)} | "
              f"{w.where} |" for w in bill.ways]
    lines.append(f"\nThe cache costs fewer {unit}-hours than serving up to {bill.break_even_passes:.0f} passes "
                 f"(where the cache's {unit}-hours reach the served way's); relabelling all {bill.epochs} passes "
                 f"costs what the authors' way does. --passes {bill.passes} prices the cache; it does not say that "
                 f"{bill.passes} pass{'es' if bill.passes > 1 else ''} of crops replayed "
                 f"distil{'' if bill.passes > 1 else 's'} as well as fresh crops every epoch.")
    return "\n".join(lines)


def planned_path(path: str) -> Path:
    """``x.yaml`` -> ``x-planned.yaml`` beside it."""
    return Path(path).with_name(Path(path).stem + "-planned.yaml")


def _times(ceiling: float) -> str:
    return "" if ceiling == 1 else f" x served ceiling {ceiling:g}"


def format_plan(plans: list, demand: float, workers: int, student_rate: float, served_ceiling: float = 1.0) -> str:
    lines = [f"students: {workers} worker(s) x {student_rate:.0f} img/s{_times(served_ceiling)} = {demand:.0f} crops/s "
             "to every teacher", "",
             "| teacher | model | crops/s per replica | from | replicas | utilization |",
             "|---|---|---:|---|---:|---:|"]
    for p in plans:
        lines.append(f"| {p.name} | {p.model} | {p.crops_per_s:.0f} | {p.source} | {p.replicas} | "
                     f"{100 * p.utilization:.0f}% |")
    return "\n".join(lines)
