"""Measure on one GPU the rates `meal-ray plan` needs for the paper's jobs, and write them as a rates file.

    python bench/gpu_check.py --output gpu-rates.json   # one GPU, < 5 min (97 s on an H200: docs/planning.md)
    meal-ray plan --config jobs/imagenet-resnet50-224.yaml --serve-config deployments/imagenet-224.yaml \\
        --rates gpu-rates.json --train-images 1281167
    python bench/gpu_check.py --cpu --output /tmp/cpu-rates.json   # the same code paths on CPU, tiny models

For each (job, Serve config) pair (jobs/imagenet-resnet50-{224,380}.yaml with deployments/imagenet-{224,380}.yaml),
with random weights (``pretrained: false``: nothing is downloaded) and a synthetic image folder of 1000 classes
(random JPEGs: speed does not care what they show):

- each teacher's crops/s, one replica (``plan.measure_teacher``), at its own input size and the app's
  ``max_batch_size``, in fp32 and under bf16 autocast;
- the student's hard-label img/s, one train worker at its per-worker batch through meal-ray's Engine
  (``plan.measure_student``), in fp32 and bf16 (``run.amp``);
- for the 224 pair, the same student training on soft labels from the teachers served by meal-ray's own Serve app
  (an embedded local Ray; teachers and student share this one GPU, so this is the authors' way on one GPU, through
  Serve: compare it with ``1 / (1/student + sum 1/teacher)`` from the figures above, which the file records too).

The file names the device (``torch.cuda.get_device_name``), the torch version and the date. ``--cpu`` runs every
step above on this machine's CPU with tiny models, batches and sizes (a job and a Serve config of its own, written
beside the output, to plan with); tests/test_gpu_check.py runs it that way so it cannot rot.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [("jobs/imagenet-resnet50-224.yaml", "deployments/imagenet-224.yaml", True),  # (job, Serve config, served)
         ("jobs/imagenet-resnet50-380.yaml", "deployments/imagenet-380.yaml", False)]
CLASSES = 1000  # the ImageNet heads of students and teachers; the soft labels must have as many classes
APP = "gpu-check-teachers"
CPU_TEACHERS = ("test_resnet", "test_efficientnet")  # --cpu: tiny timm architectures in the teachers' places


def synthetic_image_folder(root: Path, side: int, per_class: int) -> Path:
    """An ImageNet-layout folder (train/<class>/, val/<class>/) of smooth random JPEGs, ``per_class`` training
    images and one validation image per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 1)):
        for c in range(CLASSES):
            folder = root / split / f"c{c:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(small).resize((side, side), Image.BILINEAR).save(folder / f"{i}.jpg", quality=85)
    return root


def cases(cpu: bool, data_root: Path, out_dir: Path) -> list:
    """(job dict, Serve config dict, served?, job path, Serve config path) per pair: the repository's configs with
    random weights and the synthetic data; with ``cpu``, the 224 pair shrunk to tiny models, batches and sizes and
    written beside the output (so `meal-ray plan --rates` can be pointed at what was measured)."""
    out = []
    for job_path, serve_path, served in PAIRS[:1] if cpu else PAIRS:
        job = yaml.safe_load((ROOT / job_path).read_text())
        serve = yaml.safe_load((ROOT / serve_path).read_text())
        job["data"].update(root=str(data_root), loader_workers=min(8, os.cpu_count() or 1))
        job["student"]["pretrained"] = False
        args = serve["applications"][0]["args"]
        for t in args["teachers"]:
            t["pretrained"] = False
        if cpu:
            job["name"] = "gpu-check-cpu"
            job["data"].update(image_size=32, loader_workers=0)
            job["student"]["model"] = "test_resnet"
            job["optim"]["batch_size"] = 32  # 4 per worker over the job's 8 workers
            job["run"]["use_gpu"] = False
            args["teachers"] = [{"name": m.replace("_", "-"), "model": m, "pretrained": False} for m in CPU_TEACHERS]
            args["max_batch_size"] = 16
            job["teachers"]["models"] = [{"model": m, "pretrained": False} for m in CPU_TEACHERS]
            app = serve["applications"][0]
            app["deployments"] = [{"name": t["name"], "num_replicas": 1} for t in args["teachers"]]
            job_path, serve_path = (str(out_dir / "gpu-check-cpu-job.yaml"), str(out_dir / "gpu-check-cpu-serve.yaml"))
            Path(job_path).write_text(yaml.safe_dump(job, sort_keys=False))
            Path(serve_path).write_text(yaml.safe_dump(serve, sort_keys=False))
        out.append((job, serve, served, job_path, serve_path))
    return out


def served_config(serve: dict, gpu: bool) -> dict:
    """The pair's teacher app for an embedded local Ray: one replica per teacher, sharing the one GPU, no pools."""
    app = copy.deepcopy(serve["applications"][0])
    app.update(name=APP, route_prefix=None)
    share = 0.9 / len(app["args"]["teachers"])
    app["deployments"] = [{"name": t["name"], "num_replicas": 1, "max_ongoing_requests": 64,
                           "ray_actor_options": {"num_cpus": 0.5, "num_gpus": share if gpu else 0}}
                          for t in app["args"]["teachers"]]
    app["deployments"].append({"name": "ensemble", "max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0}})
    return {"proxy_location": "Disabled", "applications": [app]}


def say(start: float, text: str) -> None:
    print(f"[gpu_check {time.perf_counter() - start:5.0f}s] {text}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="gpu-rates.json", help="the rates file to write (JSON)")
    parser.add_argument("--cpu", action="store_true", help="tiny models on this machine's CPU: a smoke run")
    parser.add_argument("--seconds", type=float, default=None, help="timing per teacher (default 3; --cpu 0.2)")
    parser.add_argument("--steps", type=int, default=None, help="timed student steps (default 20; --cpu 3)")
    parser.add_argument("--no-served", action="store_true", help="skip the served run (no Ray, no Serve)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing meal-ray too

    from meal_ray.config import load_app_config, load_config, teacher_spec
    from meal_ray.serve.app import resolve_teachers
    from meal_ray.serve.rates import write_rates_file
    from meal_ray.train.plan import measure_student, measure_teacher, teacher_input_size

    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print("gpu_check: this machine has no CUDA GPU; `--cpu` runs the same steps with tiny models on the CPU.")
        return 2
    device = "cuda" if gpu else "cpu"
    device_name = torch.cuda.get_device_name(0) if gpu else f"cpu ({platform.processor() or platform.machine()}, " \
                                                             f"{os.cpu_count()} cores)"
    seconds = args.seconds if args.seconds is not None else (3.0 if gpu else 0.2)
    steps = args.steps if args.steps is not None else (20 if gpu else 3)
    output = Path(args.output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    say(start, f"{device_name}, torch {torch.__version__}; writing a synthetic image folder ...")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    data_root = synthetic_image_folder(work / "images", 320 if gpu else 40, 2)
    teachers, students, served_rates, measured_cases = [], [], [], []
    for job_raw, serve_raw, served, job_path, serve_path in cases(args.cpu, data_root, output.parent):
        app = load_app_config(serve_raw["applications"][0]["args"])
        case_teachers = []
        for spec in resolve_teachers(app, check_files=False):
            size = teacher_input_size(spec, job_raw["data"]["image_size"])
            for autocast in (None, "bf16"):
                rate = measure_teacher(teacher_spec(spec), job_raw["data"]["image_size"], 3, app.max_batch_size,
                                       autocast, seconds, device)
                case_teachers.append({"model": spec["model"], "img_size": size, "precision": autocast or "fp32",
                                      "batch": app.max_batch_size, "samples_per_s": round(rate, 2)})
                say(start, f"teacher {spec['model']} at {size} px, {autocast or 'fp32'}, batch {app.max_batch_size}: "
                           f"{rate:.1f} crops/s")
        teachers += case_teachers
        hard = {}
        for amp in (None, "bf16") if gpu else (None,):  # the engine trains fp32 on a CPU whatever run.amp says
            cfg = load_config(data=dict(job_raw, run=dict(job_raw["run"], amp=amp)))
            hard[amp] = measure_student(cfg, steps=steps, device=device)
            batch = cfg.optim.batch_size // cfg.run.num_workers
            students.append({"model": cfg.student.model, "img_size": cfg.data.image_size,
                             "precision": amp or "fp32", "batch": batch, "samples_per_s": round(hard[amp], 2),
                             "loader_workers": cfg.data.loader_workers})
            say(start, f"student {cfg.student.model} at {cfg.data.image_size} px, {amp or 'fp32'}, batch {batch} per "
                       f"worker, hard labels: {hard[amp]:.1f} img/s")
        if served and not args.no_served:
            at_app_precision = [t for t in case_teachers if t["precision"] == (app.autocast or "fp32")]
            served_rates.append(measure_served(job_raw, serve_raw, gpu, device, steps, work, hard[None],
                                               at_app_precision, start))
        measured_cases.append({"job": job_path, "serve_config": serve_path})
    write_rates_file(output, device_name, teachers, students, served_rates, host=platform.node(),
                     cases=measured_cases)
    say(start, f"wrote {output}; plan with it:")
    for case in measured_cases:
        print(f"  meal-ray plan --config {case['job']} --serve-config {case['serve_config']} --rates {output} "
              f"--train-images 1281167")
    return 0


def measure_served(job_raw: dict, serve_raw: dict, gpu: bool, device: str, steps: int, work: Path,
                   hard_rate: float, teachers: list, start: float) -> dict:
    """The student (fp32) on soft labels from the pair's teachers served by meal-ray's Serve app in an embedded
    local Ray on this machine, with the authors' one-device rate from ``teachers`` (their figures measured above at
    the app's precision) beside it."""
    import logging

    import ray

    from meal_ray.config import load_config
    from meal_ray.serve.lifecycle import teachers_up
    from meal_ray.sources.served import ServedSoftLabels
    from meal_ray.train.plan import measure_student

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    os.environ.pop("RAY_ADDRESS", None)  # never a cluster this process happens to be pointed at
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), num_gpus=1 if gpu else 0,
             include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        path = work / "served.yaml"
        path.write_text(yaml.safe_dump(served_config(serve_raw, gpu), sort_keys=False))
        say(start, "deploying the teachers on meal-ray's Serve app (embedded local Ray) ...")
        teachers_up(path, block=False, log=lambda s: None)
        cfg = load_config(data=dict(job_raw, teachers=dict(job_raw["teachers"], app_name=APP)))
        source = ServedSoftLabels(APP, prefetch=cfg.teachers.prefetch)
        try:
            rate = measure_student(cfg, steps=steps, device=device, source=source)
        finally:
            source.close()
    finally:
        ray.shutdown()
    size = cfg.data.image_size
    one_device = 1.0 / (1.0 / hard_rate + sum(1.0 / t["samples_per_s"] for t in teachers))
    say(start, f"student {cfg.student.model} at {size} px, fp32, served teachers on this one device: {rate:.1f} img/s "
               f"(hard labels {hard_rate:.1f}; the authors' way on one device, from the figures above: "
               f"{one_device:.1f})")
    return {"model": cfg.student.model, "img_size": size, "precision": "fp32",
            "batch": cfg.optim.batch_size // cfg.run.num_workers, "samples_per_s": round(rate, 2),
            "hard_samples_per_s": round(hard_rate, 2), "authors_one_device_samples_per_s": round(one_device, 2),
            "teachers": [t["model"] for t in teachers], "teacher_precision": teachers[0]["precision"],
            "note": "teachers and student share this one device"}


if __name__ == "__main__":
    sys.exit(main())
