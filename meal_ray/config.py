"""Job configuration: typed dataclasses loaded from YAML, validated, overridable from the CLI.

Defaults are the paper's ImageNet settings (README, "The method, as implemented"); small-dataset values
(crop scale, mean/std) live in the job YAML files under ``jobs/``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from meal_ray.errors import ConfigError, suggest
from meal_ray.placement import ACCELERATOR_PREFIX, ACCELERATOR_UNIT, selector_problem

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
AUTOCAST_MODES = (None, "bf16", "fp16")
DEFAULT_APP_NAME = "meal-ray-teachers"  # the Serve teacher application's name
DATASETS = ("fashion-mnist", "imagefolder")
CLIENTS = ("ingress", "direct")  # how a served job reaches the teachers
REQUESTS = ("pixels", "crops")  # what a served request carries: rendered crops, or crop boxes the replicas render


def check_autocast(key: str, value) -> None:
    if value not in AUTOCAST_MODES:
        raise ConfigError(f"{key}={value!r}: use bf16, fp16 or leave it empty (fp32).")


#: The Serve teacher application's batching defaults (``args.max_batch_size``, ``args.batch_wait_timeout_s``).
MAX_BATCH_SIZE = 64
BATCH_WAIT_TIMEOUT_S = 0.01


def check_batching(prefix: str, max_batch_size, batch_wait_timeout_s) -> None:
    """Dynamic batching of a teacher deployment (Serve app args and a deployment's user_config)."""
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ConfigError(f"{prefix}max_batch_size={max_batch_size!r} must be a whole number >= 1 "
                          "(crops per teacher forward pass).")
    if isinstance(batch_wait_timeout_s, bool) or not isinstance(batch_wait_timeout_s, (int, float)) \
            or batch_wait_timeout_s < 0:
        raise ConfigError(f"{prefix}batch_wait_timeout_s={batch_wait_timeout_s!r} must be a number >= 0 (seconds).")


def check_dataset(prefix: str, dataset: str, root: Optional[str]) -> None:
    if dataset not in DATASETS:
        raise ConfigError(f"{prefix}dataset={dataset!r} is not supported; use 'fashion-mnist' or 'imagefolder'.")
    if dataset == "imagefolder" and not root:
        raise ConfigError(f"{prefix}root is required for {prefix}dataset=imagefolder (a folder with train/ and val/).")


@dataclass
class DataConfig:
    dataset: str = "imagefolder"  # "fashion-mnist" or "imagefolder" (ImageNet layout train/ val/)
    root: Optional[str] = None  # fashion-mnist: default search path; imagefolder: required
    image_size: int = 224  # student input size in px (the crop's side; teachers resize it to their own)
    crop_scale: tuple = (0.08, 1.0)  # RandomResizedCrop scale (paper/torchvision default)
    crop_ratio: tuple = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range
    crop_pct: float = 224 / 256  # eval: Resize(size / crop_pct) + CenterCrop(size)
    mean: tuple = IMAGENET_MEAN  # per-channel normalization mean (one value: grayscale, three: RGB)
    std: tuple = IMAGENET_STD  # per-channel normalization std
    interpolation: str = "bilinear"  # crop resize: bilinear | bicubic | nearest
    train_subset: Optional[int] = None  # first N training samples (stratified), for quick runs
    val_subset: Optional[int] = None  # first N validation samples (stratified), for quick runs
    loader_workers: int = 0  # DataLoader worker processes per train worker, and relabel's render processes per
    #                          actor (GPU: 4-8; CPU: 0 keeps cores for compute)
    pin_memory: bool = False  # GPU: page-locked batches for non-blocking host-to-device copies (ignored on CPU)

    def validate(self) -> None:
        check_dataset("data.", self.dataset, self.root)
        _positive("data.image_size", self.image_size)
        lo, hi = _pair("data.crop_scale", self.crop_scale)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"data.crop_scale={list(self.crop_scale)} must satisfy 0 < min <= max <= 1.")
        _pair("data.crop_ratio", self.crop_ratio)
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"data.crop_pct={self.crop_pct} must be in (0, 1], e.g. 0.875.")
        if len(self.mean) != len(self.std):
            raise ConfigError(f"data.mean has {len(self.mean)} values but data.std has {len(self.std)}; "
                              "give one per channel.")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"data.std={list(self.std)} must be positive.")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"data.interpolation={self.interpolation!r}: use bilinear, bicubic or nearest.")
        if self.loader_workers < 0:
            raise ConfigError(f"data.loader_workers={self.loader_workers} must be >= 0 (0: load in the worker itself; "
                              "GPU: 4-8).")

    @property
    def in_chans(self) -> int:
        return len(self.mean)


@dataclass
class TeacherSpec:
    model: str = "resnet18"  # timm architecture name
    weights: Optional[str] = None  # meal-ray export dir, local weights file, or None
    pretrained: bool = False  # timm/HF-hub pretrained weights (needs internet)
    name: Optional[str] = None  # Serve deployment name; defaults to teacher<i>


def teacher_spec(fields: dict) -> TeacherSpec:
    """A TeacherSpec from a dict that may carry more (a resolved Serve spec's ``weights_given``)."""
    return TeacherSpec(**{f.name: fields[f.name] for f in dataclasses.fields(TeacherSpec) if f.name in fields})


def teacher_list(teachers) -> list:
    """A list of TeacherSpec from TeacherSpec objects, dicts or bare architecture names."""
    return [t if isinstance(t, TeacherSpec) else TeacherSpec(**t) if isinstance(t, dict) else TeacherSpec(model=t)
            for t in teachers]


@dataclass
class TeachersConfig:
    source: str = "served"  # a name in meal_ray.source_registry.SOURCES (served | local | none)
    # the teachers whose averaged soft labels the student learns (architecture + weights each)
    models: list = field(default_factory=list, metadata={"items": TeacherSpec})
    app_name: str = DEFAULT_APP_NAME  # Serve application name for the served source
    prefetch: int = 4  # batches kept in flight to the teachers (served source)
    autocast: Optional[str] = None  # None | "bf16" | "fp16" for teacher inference
    cache: Optional[str] = None  # source=cache: a soft-label cache directory written by `meal-ray relabel`
    cache_recovery: str = "marginal"  # top-k < classes (cache or reply_top_k): marginal (FKD: rest mass spread
    #                                   evenly) | renormalize
    cache_top_k: Optional[int] = None  # use only the k largest stored probabilities (k's effect, no relabel)
    request: str = "pixels"  # served: send rendered crops (pixels) or crop boxes the replicas render (crops)
    client: str = "ingress"  # served: one call to the ensemble ingress | direct: call each teacher, average here
    timeout_s: float = 600.0  # served: stop the job (resumable) when no soft labels come back for this long
    reply_top_k: Optional[int] = None  # served: replies carry only the k largest probabilities (cache_recovery
    #                                    expands them, as for a top-k cache); None: every class, fp16

    def validate(self) -> None:
        from meal_ray.source_registry import SOURCES

        if self.source not in SOURCES:
            raise ConfigError(f"teachers.source={self.source!r} is not a soft-label source."
                              f"{suggest(self.source, SOURCES)}"
                              f" Use one of: {', '.join(SOURCES)}.")
        if self.source != "none" and not self.models:
            raise ConfigError("teachers.models is empty: list at least one teacher, or set teachers.source=none.")
        if self.prefetch < 1:
            raise ConfigError(f"teachers.prefetch={self.prefetch} must be >= 1.")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or self.timeout_s <= 0:
            raise ConfigError(f"teachers.timeout_s={self.timeout_s!r} must be a number of seconds > 0 (how long to "
                              "wait for the teachers before the job stops, resumable).")
        check_autocast("teachers.autocast", self.autocast)
        if self.source == "cache" and not self.cache:
            raise ConfigError("teachers.source=cache needs teachers.cache: the directory `meal-ray relabel` wrote.")
        if self.cache_recovery not in ("marginal", "renormalize"):
            raise ConfigError(f"teachers.cache_recovery={self.cache_recovery!r}: use marginal or renormalize.")
        if self.reply_top_k is not None and (self.source != "served" or self.reply_top_k < 1):
            raise ConfigError(f"teachers.reply_top_k={self.reply_top_k} must be >= 1 and is for teachers.source=served "
                              f"(got {self.source!r}); leave it empty for full replies.")
        if self.cache_top_k is not None and self.cache_top_k < 1:
            raise ConfigError(f"teachers.cache_top_k={self.cache_top_k} must be >= 1 (or empty: all stored classes).")
        if self.request not in REQUESTS:
            raise ConfigError(f"teachers.request={self.request!r}: use pixels (send the rendered crops) or crops "
                              "(send crop boxes; the teacher replicas read the dataset and render them).")
        if self.client not in CLIENTS:
            raise ConfigError(f"teachers.client={self.client!r}: use ingress (one call to the ensemble, which fans "
                              "out and averages) or direct (each worker calls every teacher and averages: one hop).")
        if self.request == "crops" and self.source != "served":
            raise ConfigError(f"teachers.request=crops is for teachers.source=served (got {self.source!r}): the "
                              "replicas render the boxes; drop it or use the served source.")


@dataclass
class TeacherDataConfig:
    """``args.data`` of the teacher application: the training set the replicas read to render crop-box requests
    (``teachers.request: crops``); the same files as the jobs' ``data`` (shared storage)."""

    dataset: str = "fashion-mnist"  # the training set the replicas render crop boxes from: fashion-mnist | imagefolder
    root: Optional[str] = None  # imagefolder: the folder holding train/ (the job's data.root)

    def validate(self) -> None:
        check_dataset("args.data.", self.dataset, self.root)


@dataclass
class EmulateConfig:
    """``args.emulate``: benchmark mode. Each teacher replica answers after the time the real teacher would need on
    the real hardware (``overhead_ms`` + crops / ``crops_per_s`` per forward pass, sleeping, so no core is used),
    through the real request/reply path, with cheap deterministic logits. Its fingerprint says "emulated", so no
    real job mistakes it for its teachers."""

    crops_per_s: float = 1000.0  # one replica's throughput (e.g. senet154 on one V100, measured by `meal-ray plan`)
    overhead_ms: float = 0.0  # fixed cost per forward pass (kernel launches, host-device copies)

    def validate(self) -> None:
        _positive("args.emulate.crops_per_s", self.crops_per_s)
        if self.overhead_ms < 0:
            raise ConfigError(f"args.emulate.overhead_ms={self.overhead_ms} must be >= 0.")


@dataclass
class TeacherAppConfig:
    """``args`` of the Serve teacher application (``meal_ray.serve.app:build_app``), validated like a job config."""

    # the teachers to serve, one deployment each ({name, model, weights, pretrained})
    teachers: list = field(default_factory=list, metadata={"items": TeacherSpec})
    max_batch_size: int = MAX_BATCH_SIZE  # crops per teacher forward pass (dynamic batching merges requests up to this)
    batch_wait_timeout_s: float = BATCH_WAIT_TIMEOUT_S  # seconds a replica waits to merge requests into one pass
    autocast: Optional[str] = None  # null | bf16 | fp16: teacher inference precision (fp32: the paper's targets)
    base_dir: Optional[str] = None  # relative weights paths resolve against this (default: working directory)
    retry_s: float = 60.0  # how long the ingress waits for a replaced teacher replica
    data: Optional[TeacherDataConfig] = None  # the training set, for crop-box requests (None: pixels only)
    emulate: Optional[EmulateConfig] = None  # benchmarks: replicas sleep as the real teachers would compute

    def validate(self) -> "TeacherAppConfig":
        if not self.teachers:
            raise ConfigError("args.teachers must be a non-empty list, e.g. "
                              "[{name: resnet18, model: resnet18, weights: runs/fmnist-teacher-resnet18/student}].")
        check_batching("args.", self.max_batch_size, self.batch_wait_timeout_s)
        check_autocast("args.autocast", self.autocast)
        if self.retry_s < 0:
            raise ConfigError(f"args.retry_s={self.retry_s} must be >= 0 (seconds).")
        for section in (self.data, self.emulate):
            if section is not None:
                section.validate()
        return self


@dataclass
class ModelConfig:
    model: str = "resnet50"  # timm architecture name
    weights: Optional[str] = None  # start from a meal-ray export or a weights file (e.g. the hard-label init)
    pretrained: bool = False  # start from timm's pretrained weights (needs internet)
    num_classes: int = 1000  # classes of the dataset (checked against it)
    drop_rate: float = 0.0  # dropout before the classifier (timm's drop_rate)


@dataclass
class OptimConfig:
    epochs: int = 180  # training epochs (the schedule's length)
    batch_size: int = 512  # global batch, split over workers
    lr: float = 0.01  # the student's learning rate (SGD); the step schedule multiplies it by lr_gamma at each milestone
    lr_schedule: str = "step"  # step | cosine
    lr_milestones: tuple = (100,)  # step schedule: epochs at which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1  # step schedule: lr factor at each milestone
    momentum: float = 0.9  # SGD momentum (both parameter groups)
    weight_decay: float = 0.0  # SGD weight decay (the paper: 0)
    d_lr: float = 1e-4  # discriminator learning rate (constant)
    # constant: the discriminator at d_lr throughout (the paper); student: it follows the student's schedule, as in
    # the authors' code, whose lr regime overwrites every parameter group (MEAL-V2 issue #9; d_lr is then unused)
    d_lr_schedule: str = "constant"
    cutmix: bool = False  # CutMix on the uint8 batch before teachers and student see it (the paper's option)
    cutmix_beta: float = 1.0  # CutMix: Beta(beta, beta) of the mixing ratio
    cutmix_prob: float = 1.0  # CutMix: probability a batch is mixed

    def validate(self) -> None:
        _positive("optim.epochs", self.epochs)
        _positive("optim.batch_size", self.batch_size)
        _positive("optim.lr", self.lr)
        if self.lr_schedule not in ("step", "cosine"):
            raise ConfigError(f"optim.lr_schedule={self.lr_schedule!r}: use step or cosine.")
        if self.d_lr_schedule not in ("constant", "student"):
            raise ConfigError(f"optim.d_lr_schedule={self.d_lr_schedule!r}: use constant (d_lr throughout, the paper) "
                              "or student (the student's schedule, as the authors' code does).")
        if self.weight_decay < 0 or self.d_lr < 0 or not 0 <= self.momentum < 1:
            raise ConfigError("optim.weight_decay and optim.d_lr must be >= 0 and optim.momentum in [0, 1).")
        if not 0 <= self.cutmix_prob <= 1 or self.cutmix_beta <= 0:
            raise ConfigError("optim.cutmix_prob must be in [0, 1] and optim.cutmix_beta > 0.")


@dataclass
class LossConfig:
    discriminator: str = "reference"  # reference | adversarial | off
    hard_label_weight: float = 0.0  # weight of a hard-label cross-entropy added to the loss (the paper: 0)

    def validate(self) -> None:
        if self.discriminator not in ("reference", "adversarial", "off"):
            raise ConfigError(f"loss.discriminator={self.discriminator!r}: use reference, adversarial or off.")
        if self.hard_label_weight < 0:
            raise ConfigError(f"loss.hard_label_weight={self.hard_label_weight} must be >= 0.")


@dataclass
class RunConfig:
    num_workers: int = 1  # Ray Train workers (data-parallel; the global batch is split over them)
    use_gpu: bool = False  # one GPU per train worker (Ray Train's ScalingConfig.use_gpu)
    cpus_per_worker: float = 1  # CPUs per train worker (also its torch threads); resources_per_worker.CPU overrides
    # Where the train workers go, in Ray Train's ScalingConfig words (a shared cluster keeps them off the teachers'
    # nodes): resources each worker reserves beside CPU/GPU (custom resources, memory in bytes; CPU and GPU here
    # override cpus_per_worker and use_gpu's one GPU), the accelerator model its node must have (A100, H100, L4, ...),
    # and the node labels it needs ({meal-ray.io/pool: students}; Ray's syntax: value, !value, in(a, b)).
    resources_per_worker: dict = field(default_factory=dict)
    accelerator_type: Optional[str] = None  # GPU model the workers' nodes must have (needs use_gpu)
    label_selector: dict = field(default_factory=dict)  # node labels the workers' nodes must carry
    placement_timeout_s: float = 600.0  # how long the workers may wait for nodes (start, restart after a node loss)
    stop_after_steps: Optional[int] = None  # a rehearsal: end training after this many steps (counted from epoch 0);
    #                                         the schedule stays optim's own, the run is evaluated and exported as usual
    seed: int = 0  # seeds the student's init, crops, CutMix and shuffling
    output: Optional[str] = None  # default runs/<name>
    tracking_uri: Optional[str] = None  # default sqlite:///mlflow.db in the working directory
    experiment: str = "meal-ray"  # MLflow experiment name
    checkpoints_to_keep: int = 2  # Ray Train checkpoints kept (one per epoch)
    max_failures: int = 1  # worker failures Ray Train recovers from (restart from the last checkpoint); -1: unlimited
    log_every: int = 20  # steps between step log lines where no live progress line is shown (0: none)
    channels_last: bool = True  # student in NHWC memory layout: same math, ~2.7x faster mobile nets on CPU (bench/)
    amp: Optional[str] = None  # GPU: student mixed precision, bf16 | fp16 (fp16 with a loss scaler); CPU: fp32
    register_model: Optional[str] = None  # MLflow model registry name: the final student becomes a version of it

    def validate(self) -> None:
        _positive("run.num_workers", self.num_workers)
        _positive("run.checkpoints_to_keep", self.checkpoints_to_keep)
        if self.max_failures < -1:
            raise ConfigError("run.max_failures must be >= 0, or -1 for unlimited retries.")
        check_autocast("run.amp", self.amp)
        _positive("run.cpus_per_worker", self.cpus_per_worker)
        _positive("run.placement_timeout_s", self.placement_timeout_s)
        if self.stop_after_steps is not None and self.stop_after_steps <= 0:
            raise ConfigError(f"run.stop_after_steps={self.stop_after_steps!r} must be a positive whole number of "
                              "steps (or null: train every epoch of the schedule).")
        check_resources("run.resources_per_worker", self.resources_per_worker)
        cpus = self.resources_per_worker.get("CPU")
        if cpus is not None and self.cpus_per_worker not in (1, cpus):
            raise ConfigError(f"run.cpus_per_worker={self.cpus_per_worker:g} and run.resources_per_worker.CPU={cpus:g} "
                              "disagree: give the CPUs per worker once.")
        if cpus is not None and cpus <= 0:
            raise ConfigError(f"run.resources_per_worker.CPU={cpus:g} must be > 0 (each worker runs the student on "
                              "its CPUs' threads).")
        gpus = self.resources_per_worker.get("GPU")
        if gpus is not None and bool(gpus) != self.use_gpu:
            raise ConfigError(f"run.resources_per_worker.GPU={gpus:g} with run.use_gpu={str(self.use_gpu).lower()}: "
                              + ("set run.use_gpu: true for GPU workers." if gpus else
                                 "drop GPU from resources_per_worker (or set run.use_gpu: false)."))
        if self.accelerator_type is not None:
            if not isinstance(self.accelerator_type, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*",
                                                                               self.accelerator_type):
                raise ConfigError(f"run.accelerator_type={self.accelerator_type!r} must be Ray's accelerator name, "
                                  "e.g. A100, H100, L4 (ray.util.accelerators).")
            if not self.use_gpu:
                raise ConfigError(f"run.accelerator_type={self.accelerator_type} picks the GPU model of the workers' "
                                  "nodes: set run.use_gpu: true too.")
        problem = selector_problem(self.label_selector)
        if problem:
            raise ConfigError(f"run.label_selector={self.label_selector!r}: {problem}.")

    def worker_resources(self) -> dict:
        """What each train worker reserves on its node, as Ray Train asks for it (ScalingConfig)."""
        out = {"CPU": float(self.cpus_per_worker)}
        if self.use_gpu:
            out["GPU"] = 1.0
        out.update({k: float(v) for k, v in self.resources_per_worker.items()})
        if self.accelerator_type:
            out[ACCELERATOR_PREFIX + self.accelerator_type] = ACCELERATOR_UNIT
        return {k: v for k, v in out.items() if v}


@dataclass
class JobConfig:
    name: str = "meal-ray"  # job name: the run directory (runs/<name>) and the MLflow run name
    mode: str = "distill"  # distill | pretrain
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "JobConfig":
        if self.mode not in ("distill", "pretrain"):
            raise ConfigError(f"mode={self.mode!r}: use distill or pretrain.")
        for section in (self.data, self.teachers, self.optim, self.loss, self.run):
            section.validate()
        if self.mode == "pretrain" and self.teachers.source != "none":
            raise ConfigError("mode=pretrain trains with hard labels: set teachers.source=none.")
        if self.mode == "distill" and self.teachers.source == "none":
            from meal_ray.source_registry import SOURCES

            raise ConfigError("mode=distill needs soft labels: set teachers.source to one of "
                              f"{', '.join(s for s in SOURCES if s != 'none')}.")
        _positive("student.num_classes", self.student.num_classes)
        if self.optim.batch_size % self.run.num_workers:
            raise ConfigError(
                f"optim.batch_size={self.optim.batch_size} is the global batch and must be divisible by "
                f"run.num_workers={self.run.num_workers}."
            )
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output or f"runs/{self.name}").resolve()

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def check_resources(key: str, resources) -> None:
    """Ray resource amounts by name ({CPU: 8, GPU: 1, memory: 8e9, my_resource: 1}): names as Ray spells them."""
    for name, amount in resources.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key} has the resource name {name!r}: give Ray's resource names (CPU, GPU, memory, "
                              "or a custom resource the nodes offer).")
        if name.upper() in ("CPU", "GPU", "TPU") and name != name.upper():
            raise ConfigError(f"{key}.{name}: Ray's resource names are case-sensitive, write {name.upper()}.")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise ConfigError(f"{key}.{name}={amount!r} must be a number >= 0 (memory in bytes).")


def _positive(key: str, value) -> None:
    if not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{key}={value!r} must be a positive number.")


def _pair(key: str, value) -> tuple:
    if len(value) != 2 or value[0] > value[1]:
        raise ConfigError(f"{key}={list(value)} must be two numbers [min, max] with min <= max.")
    return value


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(cls, data: Any, path: str):
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and wrong types by name."""
    if dataclasses.is_dataclass(cls):
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}.")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in data.items():
            full = f"{path}.{key}" if path else key
            if key not in names:
                raise ConfigError(f"unknown config key {full!r}.{suggest(key, names)} "
                                  f"Valid keys here: {', '.join(names)}.")
            kwargs[key] = _coerce_value(hints[key], value, full, cls, key)
        return cls(**kwargs)
    return data


def _coerce_value(hint, value, path: str, owner, key):
    items = next(f.metadata.get("items") for f in dataclasses.fields(owner) if f.name == key)
    if items is TeacherSpec:
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list of teachers, e.g. [{{model: resnet18, weights: path}}].")
        return [_coerce(TeacherSpec, v if isinstance(v, dict) else {"model": v}, f"{path}[{i}]")
                for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _coerce(hint, value, path)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        if dataclasses.is_dataclass(hint):
            return _coerce(hint, value, path)
    if hint is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r} must be a mapping, e.g. {{key: value}} "
                              "(on the command line: --set '" + path + "={key: value}').")
        out = {}
        for k, v in value.items():
            if isinstance(v, str) and owner is RunConfig and key == "resources_per_worker":
                try:
                    v = float(v)  # YAML 1.1 reads 8e9 (no dot) as a string
                except ValueError:
                    pass
            out[str(k)] = v
        return out
    if hint is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be true or false.")
        return value
    if hint in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} must be a number.")
        if hint is int and float(value) != int(value):
            raise ConfigError(f"{path}={value!r} must be a whole number.")
        return hint(value)
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{path}={value!r} must be a string.")
    return value


def config_differences(a: dict, b: dict, ignore: Iterable[str] = ()) -> list:
    """The dotted keys whose values differ between two job configs as dicts (tuples and lists alike), leaving out the
    dotted keys in ``ignore`` (e.g. ``optim.epochs``, which a resumed run may grow)."""
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    skip = set(ignore)

    def walk(x, y, prefix: str) -> list:
        if isinstance(x, dict) and isinstance(y, dict):
            return [d for k in sorted(set(x) | set(y)) if f"{prefix}{k}" not in skip
                    for d in walk(x.get(k), y.get(k), f"{prefix}{k}.")]
        return [] if x == y else [prefix.rstrip(".")]

    return walk(a, b, "")


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["optim.epochs=3", "teachers.models.0.pretrained=false"]`` into a nested dict (values parsed as YAML; a
    number in the key is a list index)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optim.epochs=3.")
        key, raw = item.split("=", 1)
        node = out
        parts = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def deep_merge(base: dict, update: dict, path: str = "") -> dict:
    """``base`` with ``update`` merged in: mappings key by key, a list item by item where ``update`` gives indices."""
    merged = dict(base)
    for k, v in update.items():
        old, where = merged.get(k), f"{path}{k}"
        if isinstance(v, dict) and isinstance(old, dict):
            merged[k] = deep_merge(old, v, where + ".")
        elif isinstance(v, dict) and isinstance(old, list) and v and all(isinstance(i, int) for i in v):
            items = list(old)
            for i, item in v.items():
                if i >= len(items):
                    raise ConfigError(f"{where}.{i}: {where} has {len(items)} item(s), numbered from 0.")
                items[i] = (deep_merge(items[i], item, f"{where}.{i}.")
                            if isinstance(item, dict) and isinstance(items[i], dict) else item)
            merged[k] = items
        else:
            merged[k] = v
    return merged


def read_yaml(path: str | Path, what: str = "config file", examples: str = "jobs/") -> dict:
    """Read a YAML mapping, turning a missing file or a syntax error into a ConfigError that names the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist; see {examples} for examples.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {str(p)!r} is not a text file (not UTF-8); give the YAML file, see {examples} "
                          "for examples.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(p)!r} must hold a YAML mapping (key: value lines), not a "
                          f"{type(data).__name__}; see {examples} for examples.")
    return data


def load_app_config(args: Optional[dict]) -> TeacherAppConfig:
    """Validate the Serve teacher application's ``args`` with the job config's machinery."""
    return _coerce(TeacherAppConfig, dict(args or {}), "args").validate()


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                data: Optional[dict] = None) -> JobConfig:
    """Load a job YAML (or dict), apply ``key=value`` overrides, and validate."""
    raw: dict = read_yaml(path) if path is not None else {}
    if data:
        raw = deep_merge(raw, data)
    if overrides:
        raw = deep_merge(raw, parse_overrides(overrides))
    return _coerce(JobConfig, raw, "").validate()
