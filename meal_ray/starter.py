"""`meal-ray init`: job and Serve configs for the user's own ImageNet-layout folder and teachers.

It reads the folder (``train/<class>/``, ``val/<class>/``; JPEG, PNG, ... in RGB or grayscale), measures what a config
needs from a bounded, evenly spread sample of the training images (channels, image size, per-channel mean/std), checks
every teacher against the folder (architecture, class count, channels), and writes, each validated by the project's
own loaders before anything is written:

- ``pretrain.yaml``: the student's hard-label init (``meal-ray pretrain``), unless ``--student-init timm|random``;
- ``distill.yaml``: MEAL V2 from the teachers (``meal-ray distill``; ``--set teachers.source=local`` runs the
  teachers in-process instead of on Ray Serve);
- ``serve.yaml``: the teachers as a Ray Serve application (``meal-ray teachers up`` / ``serve deploy``);
- ``teachers/<name>/``: a teacher given as a bare state dict (``.safetensors``, ``.pth``) becomes a meal-ray export
  (``model.safetensors`` + ``config.json``) that records its preprocessing: the folder's image size and mean/std.

Measured values (README "Your own data, end to end"):

- channels: 1 (``in_chans`` 1, one mean/std value) when every sampled image is grayscale, stored as L or as RGB with
  equal channels (within JPEG rounding); else 3 (grayscale images are then replicated, as the dataset reads them);
- image size: the median shorter side of the sampled images, rounded up to a multiple of 8, clamped to [32, 224];
  below 64 px the crops are mild (scale 0.85-1, near square, eval crop_pct 1.0, as the Fashion-MNIST jobs), else
  the paper's ImageNet crops (scale 0.08-1, crop_pct 0.875);
- mean/std: per channel over every pixel of the sampled images (at their own size), in [0, 1].
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from meal_ray.errors import ConfigError, DatasetError, MealRayError
from meal_ray.placement import POOL_LABEL, STUDENT_POOL, TEACHER_POOL

DEFAULT_SAMPLE = 500  # training images read for channels, size and mean/std
SMALL_IMAGES = 64  # median shorter side below this: mild crops (the items fill the frame)
GRAY_TOLERANCE = 3  # max |R-G|, |G-B| of an RGB-stored grayscale image (JPEG's chroma rounding)
STUDENT_INITS = ("pretrain", "timm", "random")
FILES = ("pretrain.yaml", "distill.yaml", "serve.yaml")


@dataclass
class FolderStats:
    root: Path
    classes: tuple
    train_count: int
    val_count: int
    sampled: int
    channels: int
    median_side: int
    image_size: int
    mean: tuple
    std: tuple
    modes: dict = field(default_factory=dict)  # PIL mode -> count in the sample


@dataclass
class TeacherEntry:
    name: str  # Serve deployment name
    model: str  # timm architecture
    source: str  # the --teacher value's path ("" for a hub name)
    kind: str  # "export" | "state-dict" | "hub"
    weights: Optional[str] = None  # what the configs name (absolute)


# ----------------------------------------------------------------------------- the folder


def _class_folders(split: Path) -> list:
    return sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_folder(root: str | Path) -> tuple:
    """``(root, train ImageFolderUint8, val ImageFolderUint8)`` of an ImageNet-layout folder, or a DatasetError that
    says what the layout must be."""
    from meal_ray.data.datasets import ImageFolderUint8

    layout = "DIR/train/<class>/<image> and DIR/val/<class>/<image> (one subfolder per class, .jpg/.png images)"
    root = Path(os.path.expanduser(str(root))).resolve()
    if not root.is_dir():
        raise DatasetError(f"--data {str(root)!r} does not exist or is not a folder; give the folder holding {layout}.")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetError(f"--data {str(root)!r} has no {split}/ subfolder; expected {layout}.")
        if not _class_folders(root / split):
            raise DatasetError(f"{root / split} holds no class subfolders; expected {layout}.")
    train_classes, val_classes = _class_folders(root / "train"), _class_folders(root / "val")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DatasetError(
            f"{root}/train and {root}/val hold different class folders ({len(train_classes)} vs {len(val_classes)}"
            f"{'; only in train: ' + ', '.join(only_train[:10]) if only_train else ''}"
            f"{'; only in val: ' + ', '.join(only_val[:10]) if only_val else ''}); "
            "give both splits the same class subfolders (an empty class needs at least one image in each).")
    train, val = ImageFolderUint8(root / "train"), ImageFolderUint8(root / "val")
    if len(train.classes) < 2:
        raise DatasetError(f"{root}/train holds {len(train.classes)} class with images; a classifier needs >= 2.")
    return root, train, val


def _is_gray(arr: np.ndarray) -> bool:
    if arr.ndim == 2:
        return True
    a = arr.astype(np.int16)
    return (int(np.abs(a[..., 0] - a[..., 1]).max()) <= GRAY_TOLERANCE
            and int(np.abs(a[..., 1] - a[..., 2]).max()) <= GRAY_TOLERANCE)


def measure_folder(root: str | Path, sample: int = DEFAULT_SAMPLE, image_size: Optional[int] = None) -> FolderStats:
    """Channels, image size and per-channel mean/std from ``sample`` training images spread evenly over the folder."""
    from PIL import Image, UnidentifiedImageError

    if sample < 1:
        raise ConfigError(f"--sample={sample} must be >= 1 (training images read for the statistics).")
    root, train, val = check_folder(root)
    samples = train.folder.samples
    picks = sorted(set(np.linspace(0, len(samples) - 1, min(sample, len(samples))).round().astype(int).tolist()))
    images, sides, modes, gray = [], [], {}, True
    for i in picks:
        path = samples[i][0]
        try:
            with Image.open(path) as im:
                modes[im.mode] = modes.get(im.mode, 0) + 1
                sides.append(min(im.size))
                if im.mode in ("L", "1", "I", "I;16", "F", "LA"):
                    arr = np.asarray(im.convert("L"))
                else:
                    arr = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise DatasetError(f"cannot read image {path}: {e}. Remove or replace the file.") from None
        gray = gray and _is_gray(arr)
        images.append(arr)
    channels = 1 if gray else 3
    total = np.zeros(channels)
    squares = np.zeros(channels)
    count = 0
    for arr in images:
        if channels == 1:  # luminance, as the dataset reads RGB-stored grayscale images (PIL's convert("L"))
            x = (arr if arr.ndim == 2 else np.asarray(Image.fromarray(arr).convert("L"))).reshape(-1, 1)
        else:
            x = (np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 2 else arr).reshape(-1, 3)
        x = x.astype(np.float64) / 255.0
        total += x.sum(0)
        squares += (x * x).sum(0)
        count += len(x)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    std = np.where(std < 1e-3, 1.0, std)  # constant images: no scaling rather than a division by ~0
    median = int(np.median(sides))
    size = image_size or min(224, max(32, -(-median // 8) * 8))
    if image_size is not None and image_size < 8:
        raise ConfigError(f"--image-size={image_size} must be >= 8 pixels.")
    return FolderStats(root=root, classes=tuple(train.classes), train_count=len(train), val_count=len(val),
                       sampled=len(picks), channels=channels, median_side=median, image_size=int(size),
                       mean=tuple(round(float(v), 4) for v in mean), std=tuple(round(float(v), 4) for v in std),
                       modes=modes)


def data_section(stats: FolderStats) -> dict:
    small = stats.median_side < SMALL_IMAGES
    return dict(
        dataset="imagefolder", root=str(stats.root), image_size=stats.image_size,
        crop_scale=[0.85, 1.0] if small else [0.08, 1.0],
        crop_ratio=[0.9, 1.1] if small else [0.75, 1.3333],
        crop_pct=1.0 if small else 0.875,
        mean=list(stats.mean), std=list(stats.std), interpolation="bilinear")


def data_config(stats: FolderStats) -> dict:
    """The preprocessing (timm pretrained_cfg fields) the configs train with: what a teacher export records."""
    d = data_section(stats)
    return dict(input_size=(stats.channels, d["image_size"], d["image_size"]), mean=tuple(d["mean"]),
                std=tuple(d["std"]), interpolation=d["interpolation"], crop_pct=d["crop_pct"], crop_mode="center")


# ----------------------------------------------------------------------------- teachers


TEACHER_SYNTAX = ("--teacher takes ARCH=PATH: a timm architecture and its weights, a state dict (.safetensors, "
                  ".pth, .bin) or a meal-ray export directory, e.g. --teacher resnet18=/models/resnet18.safetensors; "
                  "or a bare timm hub name with pretrained weights (1000 ImageNet classes), e.g. "
                  "--teacher resnet50.a1_in1k")


def parse_teacher(text: str) -> tuple:
    """``ARCH=PATH`` -> (arch, path); a bare ``ARCH`` -> (arch, ""). Refuses anything else, naming the syntax."""
    text = str(text).strip()
    arch, sep, path = text.partition("=")
    arch, path = arch.strip(), path.strip()
    if not arch or (sep and not path) or any(c.isspace() for c in arch) or "/" in arch and not sep:
        raise ConfigError(f"--teacher {text!r}: {TEACHER_SYNTAX}.")
    return arch, path


def check_teachers(values, stats: FolderStats) -> list:
    """Each --teacher checked against timm and the folder (files, class count, channels); nothing loaded yet."""
    from meal_ray.models import check_model_name, is_export_dir, read_export_config

    if not values:
        raise ConfigError(f"give at least one teacher. {TEACHER_SYNTAX}.")
    entries, names = [], set()
    for value in values:
        arch, path = parse_teacher(value)
        check_model_name(arch)
        base = re.sub(r"[^A-Za-z0-9_.-]", "-", arch.split(".")[0])
        name, n = base, 2
        while name in names or name == "ensemble":
            name, n = f"{base}-{n}", n + 1
        names.add(name)
        if not path:
            if len(stats.classes) != 1000:
                raise ConfigError(
                    f"--teacher {value!r}: a timm hub teacher predicts ImageNet's 1000 classes, but {stats.root} has "
                    f"{len(stats.classes)}. Fine-tune it on the folder first (`meal-ray pretrain` with "
                    f"student.model={arch} and student.pretrained=true), then pass --teacher {arch}=<its export>.")
            entries.append(TeacherEntry(name, arch, "", "hub"))
            continue
        p = Path(os.path.expanduser(path)).resolve()
        if is_export_dir(p):
            cfg = read_export_config(p)
            got_classes = cfg.get("num_classes")
            got_chans = cfg.get("model_args", {}).get("in_chans",
                                                      cfg.get("pretrained_cfg", {}).get("input_size", [3])[0])
            if cfg.get("architecture") != arch.split(".")[0]:
                raise ConfigError(f"--teacher {value!r}: {p} holds a {cfg.get('architecture')!r} model; "
                                  f"write --teacher {cfg.get('architecture')}={path}.")
            if got_classes != len(stats.classes) or got_chans != stats.channels:
                raise ConfigError(
                    f"--teacher {value!r}: the export predicts {got_classes} classes from {got_chans}-channel images, "
                    f"but {stats.root} has {len(stats.classes)} classes of {stats.channels}-channel images; use a "
                    "teacher trained on this folder.")
            labels = cfg.get("label_names")
            if labels and tuple(labels) != stats.classes:
                raise ConfigError(f"--teacher {value!r}: the export was trained with other class names or order "
                                  f"({', '.join(labels[:4])}, ...) than the folder's ({', '.join(stats.classes[:4])},"
                                  " ...); use a teacher trained on this folder.")
            entries.append(TeacherEntry(name, arch, path, "export", str(p)))
        elif p.is_file():
            entries.append(TeacherEntry(name, arch, path, "state-dict"))
        else:
            raise ConfigError(f"--teacher {value!r}: {p} does not exist. {TEACHER_SYNTAX}.")
    return entries


def load_state_dict_teacher(entry: TeacherEntry, stats: FolderStats):
    """The timm model with the file's weights loaded strictly (a wrong class count or channel count is named)."""
    import timm
    from timm.models import load_checkpoint

    from meal_ray.models import check_weights_readable

    path = Path(os.path.expanduser(entry.source)).resolve()
    check_weights_readable(path)
    model = timm.create_model(entry.model, num_classes=len(stats.classes), in_chans=stats.channels)
    try:
        load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load, safetensors and load_state_dict raise their own types
        detail = " ".join(str(e).split())
        shapes = re.findall(r"size mismatch for ([\w.]+): copying a param with shape torch.Size\((\[[^\]]*\])\)",
                            detail)
        hint = ("; ".join(f"{k} has shape {s} in the file" for k, s in shapes[:3]) if shapes else detail[:300])
        raise ConfigError(
            f"--teacher {entry.model}={entry.source}: the file does not fit {entry.model!r} with "
            f"{len(stats.classes)} classes and {stats.channels} input channel(s) ({hint}). Give the architecture the "
            f"file was trained as, trained on this folder ({len(stats.classes)} classes, "
            f"{'grayscale' if stats.channels == 1 else 'RGB'}).") from None
    return model.eval()


# ----------------------------------------------------------------------------- configs


def _flow(value) -> str:
    """A value on one line: JSON is YAML (quoted paths, flow lists and mappings)."""
    return json.dumps(value)


def _job_text(kind: str, *, name: str, stats: FolderStats, student: str, student_init: str, teachers: list,
              out: Path, source: str, app_name: str, cpus: int, pools: bool = False) -> str:
    d = data_section(stats)
    small = stats.median_side < SMALL_IMAGES
    lines = [
        f"# Written by `meal-ray init` for {stats.root} ({len(stats.classes)} classes, {stats.train_count} train / "
        f"{stats.val_count} val images).",
        f"# Measured on {stats.sampled} training images: {stats.channels} channel(s), median shorter side "
        f"{stats.median_side} px. Edit freely; `meal-ray {kind} --config <this file> --set key=value` overrides.",
    ]
    if kind == "pretrain":
        lines += ["# The student's init: hard labels on train/, evaluated on val/; MEAL V2 (distill.yaml) starts from "
                  "its export.", f"name: {name}-pretrain", "mode: pretrain"]
    else:
        lines += ["# MEAL V2: soft labels of the teacher ensemble + discriminator, no hard labels.",
                  f"name: {name}-distill", "mode: distill"]
    lines += [
        "data:",
        "  dataset: imagefolder",
        f"  root: {_flow(d['root'])}",
        f"  image_size: {d['image_size']}       # training crop size; measured: median shorter side, "
        "rounded up to x8, in [32, 224]",
        f"  crop_scale: {_flow(d['crop_scale'])}   # RandomResizedCrop scale "
        + ("(mild: small images, the object fills the frame)" if small else "(the paper's ImageNet crops)"),
        f"  crop_ratio: {_flow(d['crop_ratio'])}",
        f"  crop_pct: {d['crop_pct']}           # eval: Resize(image_size / crop_pct) + CenterCrop(image_size)",
        f"  mean: {_flow(d['mean'])}   # per channel, measured "
        f"({'grayscale: in_chans 1' if stats.channels == 1 else 'RGB'})",
        f"  std: {_flow(d['std'])}",
        "  interpolation: bilinear",
        "  train_subset: null        # e.g. 10000: a stratified subset, for a quick first run",
        "  val_subset: null",
        "  loader_workers: 0         # GPU: 4-8 decode processes per worker",
        "student:",
        f"  model: {student}",
    ]
    if kind == "distill" and student_init == "pretrain":
        lines.append(f"  weights: {_flow(str(out / 'runs' / 'pretrain' / 'student'))}   # the export "
                     "`meal-ray pretrain --config pretrain.yaml` writes")
    elif student_init == "timm":
        lines.append("  pretrained: true          # timm's ImageNet weights (needs internet); new classifier")
    lines.append(f"  num_classes: {len(stats.classes)}")
    if kind == "pretrain":
        lines += ["teachers:", "  source: none", "optim:", "  epochs: 10", "  batch_size: 128", "  lr: 0.1",
                  "  lr_schedule: cosine", "  weight_decay: 0.00005"]
    else:
        lines += ["teachers:",
                  f"  source: {source}           # served: Ray Serve app (serve.yaml) | local: in-process teachers",
                  f"  app_name: {app_name}", "  models:"]
        for t in teachers:
            spec = {"model": t.model}
            spec.update({"weights": t.weights} if t.weights else {"pretrained": True})
            lines.append(f"    - {_flow(spec)}")
        lines += ["optim:", "  epochs: 40", "  batch_size: 128", "  lr: 0.05", "  lr_schedule: cosine",
                  "  cutmix: true              # mixed images: where soft labels beat hard ones (README, demo)",
                  "loss:", "  discriminator: reference"]
    lines += ["run:", "  num_workers: 1             # Ray Train workers (GPU: one per GPU, use_gpu: true)",
              "  use_gpu: false", f"  cpus_per_worker: {cpus}"]
    if pools:
        lines.append(f"  label_selector: {_flow({POOL_LABEL: STUDENT_POOL})}   # the student pool's nodes")
    else:
        lines.append(f"  # label_selector: {_flow({POOL_LABEL: STUDENT_POOL})}   # on a shared cluster: the student "
                     "pool (meal-ray init --pools)")
    lines.append(f"  output: {_flow(str(out / 'runs' / kind))}")
    return "\n".join(lines) + "\n"


def _serve_dict(stats: FolderStats, teachers: list, app_name: str, pools: bool = False) -> dict:
    args = {"teachers": [dict({"name": t.name, "model": t.model},
                              **({"weights": t.weights} if t.weights else {"pretrained": True})) for t in teachers],
            "max_batch_size": 128, "batch_wait_timeout_s": 0.01, "autocast": None,
            "data": {"dataset": "imagefolder", "root": str(stats.root)}}
    deployments = [{"name": t.name, "num_replicas": 1, "max_ongoing_requests": 16,
                    "ray_actor_options": {"num_cpus": 1}} for t in teachers]
    deployments.append({"name": "ensemble", "num_replicas": 1, "max_ongoing_requests": 32,
                        "ray_actor_options": {"num_cpus": 0}})
    app = {"name": app_name, "import_path": "meal_ray.serve.app:build_app", "route_prefix": None, "args": args,
           "deployments": deployments}
    if pools:
        from meal_ray.serve.app import place_on_pool

        place_on_pool(app, {POOL_LABEL: TEACHER_POOL})
    return {"proxy_location": "Disabled", "applications": [app]}


def validate_serve(raw: dict, path: str) -> None:
    """The Serve config follows the `serve deploy` schema, its args meal-ray's, and its teachers' files exist."""
    from ray.serve.schema import ServeDeploySchema

    from meal_ray.config import load_app_config
    from meal_ray.serve.app import resolve_teachers

    try:
        ServeDeploySchema.model_validate(raw)
    except Exception as e:  # pydantic ValidationError
        raise ConfigError(f"the Serve config {path} does not follow the `serve deploy` schema: {e}") from None
    resolve_teachers(load_app_config(raw["applications"][0]["args"]))


def init_job(data: str, teachers: list, output: str, *, student: str = "mobilenetv3_small_050",
             student_init: str = "pretrain", name: Optional[str] = None, image_size: Optional[int] = None,
             sample: int = DEFAULT_SAMPLE, source: str = "served", force: bool = False, log=print,
             pools: bool = False) -> dict:
    """Measure the folder, check the teachers, write the configs (and teacher exports). Returns the written paths."""
    from meal_ray.config import load_config
    from meal_ray.files import write_text_atomic
    from meal_ray.models import check_model_name, export_model

    if student_init not in STUDENT_INITS:
        raise ConfigError(f"--student-init={student_init!r}: use {', '.join(STUDENT_INITS)}.")
    if source not in ("served", "local"):
        raise ConfigError(f"--teachers-source={source!r}: use served or local.")
    check_model_name(student)
    out = Path(os.path.expanduser(output)).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {str(out)!r} is a file; give a folder for the configs.")
    files = {f: out / f for f in FILES if f != "pretrain.yaml" or student_init == "pretrain"}
    existing = [str(p) for p in files.values() if p.exists()]
    if existing and not force:
        raise ConfigError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; edit "
                          f"{'it' if len(existing) == 1 else 'them'}, choose another --output, or add --force to "
                          "overwrite.")
    stats = measure_folder(data, sample, image_size)
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "-", out.name) or "my-job"
    entries = check_teachers(teachers, stats)
    loaded = {t.name: load_state_dict_teacher(t, stats) for t in entries if t.kind == "state-dict"}
    for t in entries:
        if t.kind == "state-dict":
            t.weights = str(out / "teachers" / t.name)
    app_name = f"{name}-teachers"
    cpus = max(1, min(os.cpu_count() or 1, 8))
    texts = {f: _job_text(f.split(".")[0], name=name, stats=stats, student=student, student_init=student_init,
                          teachers=entries, out=out, source=source, app_name=app_name, cpus=cpus, pools=pools)
             for f in files if f != "serve.yaml"}
    for f, text in texts.items():  # what the user will run must load as written
        try:
            load_config(data=yaml.safe_load(text))
        except (MealRayError, yaml.YAMLError) as e:
            raise ConfigError(f"meal-ray init wrote a {f} its own loader refuses ({e}); please report it.") from None
    serve = _serve_dict(stats, entries, app_name, pools)
    out.mkdir(parents=True, exist_ok=True)
    dc = data_config(stats)
    for t in entries:
        if t.kind == "state-dict":
            export_model(loaded[t.name], t.weights, dc, label_names=stats.classes)
            log(f"[init] teacher {t.name}: {t.source} -> {t.weights} (a meal-ray export recording its preprocessing: "
                f"{dc['input_size'][1]} px, mean {list(dc['mean'])}, std {list(dc['std'])})")
    validate_serve(serve, str(files["serve.yaml"]))
    header = (f"# Written by `meal-ray init`: the teachers of {files['distill.yaml'].name} as a Ray Serve "
              "application.\n"
              f"#   meal-ray teachers up --config {files['serve.yaml']}     # embedded local Ray, blocks\n"
              f"#   serve deploy {files['serve.yaml']}                      # on a running cluster\n"
              "# One CPU replica per teacher; on GPUs: ray_actor_options: {num_gpus: 1}, autocast: bf16, "
              "more replicas (`meal-ray plan`).\n"
              + (f"# Every replica runs on the teacher pool: nodes labelled {POOL_LABEL}={TEACHER_POOL}.\n" if pools
                 else ""))
    texts["serve.yaml"] = header + yaml.safe_dump(serve, sort_keys=False)
    for f, path in files.items():
        write_text_atomic(path, texts[f])
    log(f"[init] {stats.root}: {len(stats.classes)} classes ({', '.join(stats.classes[:5])}"
        f"{', ...' if len(stats.classes) > 5 else ''}; class index = sorted folder name), {stats.train_count} train / "
        f"{stats.val_count} val images")
    log(f"[init] from {stats.sampled} sampled training images: {stats.channels} channel(s) "
        f"({', '.join(f'{m} {n}' for m, n in sorted(stats.modes.items()))}), median shorter side {stats.median_side} "
        f"px -> image_size {stats.image_size}, mean {list(stats.mean)}, std {list(stats.std)}")
    for f, path in files.items():
        log(f"[init] wrote {path}")
    steps = []
    if student_init == "pretrain":
        steps.append(f"meal-ray pretrain --config {_rel(files['pretrain.yaml'])}")
    distill = f"meal-ray distill --config {_rel(files['distill.yaml'])}"
    steps += ([distill + "   # teachers in-process"] if source == "local" else
              [distill + " --set teachers.source=local   # teachers in-process; or on Ray Serve:",
               f"meal-ray teachers up --config {_rel(files['serve.yaml'])}   # in a second terminal, then",
               distill + " --address <the address `teachers up` prints>"])
    steps += [
              f"meal-ray evaluate --model {_rel(out / 'runs' / 'distill' / 'student')} --dataset imagefolder "
              f"--root {stats.root}"]
    log("[init] next:\n  " + "\n  ".join(steps))
    return {"stats": stats, "teachers": entries, "files": {f: str(p) for f, p in files.items()}}


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
