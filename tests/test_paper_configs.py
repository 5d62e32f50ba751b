"""The paper's own configs on the session's cluster, so that they cannot rot: deployments/imagenet-{224,380}.yaml serve
the paper's teachers (real architectures, random weights: `pretrained: false`, no hub download here; CPU instead of
GPUs) on the teacher nodes, and jobs/imagenet-resnet50-{224,380}.yaml distil a few steps from them through
`ray job submit` on the student node, both ensembles and both jobs at once. Overridden: only what this machine cannot
hold (the data: a tiny synthetic 1000-class ImageNet-layout folder; GPUs, batch, workers, and where the run stops), and
each application's name (its size: both configs name theirs meal-ray-teachers, one ensemble per cluster). The schedule,
the discriminator, the crops and the teacher set stay the configs' own.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import recorded_batch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = os.path.dirname(sys.executable)
CLASSES = 1000
PAPER = {224: ("imagenet-224.yaml", "imagenet-resnet50-224.yaml"),
         380: ("imagenet-380.yaml", "imagenet-resnet50-380.yaml")}
# what this machine cannot hold, and nothing else: the job's data, CPUs for GPUs, a 2-image batch, one worker, and a
# rehearsal's end after 2 steps (run.stop_after_steps; optim's 180 epochs and milestones stay)
JOB_OVERRIDES = ["data.loader_workers=0", "data.val_subset=8", "student.pretrained=false",
                 "teachers.models.0.pretrained=false", "teachers.models.1.pretrained=false", "optim.batch_size=2",
                 "run.num_workers=1", "run.use_gpu=false", "run.cpus_per_worker=1", "run.stop_after_steps=2"]


def write_imagenet_folder(root: Path, size: int) -> Path:
    """An ImageNet-layout folder: 1000 class folders in train/ and val/, one ``size`` px JPEG each (smooth random
    colour fields, as cheap to decode as photographs of that size)."""
    from PIL import Image

    rng = np.random.default_rng(size)
    for split in ("train", "val"):
        for c in range(CLASSES):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
            coarse.resize((size, size), Image.BICUBIC).save(folder / "0.jpg", quality=85)
    return root


def rehearsal_app(size: int, data_root: Path) -> dict:
    """The paper's Serve application with random-init teachers, CPUs instead of GPUs, and the synthetic folder to
    render crop-box requests from; its deployments, batching, autoscaling and teacher-pool labels unchanged. Both
    ensembles are served at once here, so each application is named by its size (the configs both say
    meal-ray-teachers: a cluster serves one of them)."""
    config = yaml.safe_load((ROOT / "deployments" / PAPER[size][0]).read_text())
    (app,) = config["applications"]
    app["name"] = app_name(size)
    app["args"]["teachers"] = [dict(t, pretrained=False) for t in app["args"]["teachers"]]
    app["args"]["data"] = {"dataset": "imagefolder", "root": str(data_root)}
    for d in app["deployments"]:
        options = d["ray_actor_options"]
        options.pop("num_gpus", None)
        options["num_cpus"] = 0 if d["name"] == "ensemble" else 1
    return app


def app_name(size: int) -> str:
    return f"meal-ray-teachers-{size}"


def replica_footprint(cluster, app: str, handle, deployment: str, image: np.ndarray) -> dict:
    """One replica's resident memory (its process, read here: the nodes share this machine) and single-image latency
    (median of 3 requests after a warm-up)."""
    import psutil
    from ray.util.state import list_actors

    from meal_ray.serve.protocol import TeacherRequest

    actors = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, detail=True)
              if a.class_name == f"ServeReplica:{app}:{deployment}"]
    assert actors, deployment
    request = TeacherRequest.from_images(torch.from_numpy(image[None]))
    handle.remote(request).result(timeout_s=300)
    latencies = []
    for _ in range(3):
        start = time.perf_counter()
        handle.remote(request).result(timeout_s=300)
        latencies.append(time.perf_counter() - start)
    return {"rss_mb": round(psutil.Process(actors[0].pid).memory_info().rss / 2**20),
            "latency_ms": round(1000 * statistics.median(latencies))}


def test_paper_teachers_serve_and_the_paper_jobs_distil_from_them_through_ray_job_submit(cluster, tmp_path):
    """Both paper ensembles deployed together (one Serve config, each application on the teacher pool), every replica
    checked against the same network built here, then both paper jobs submitted at once, as two users of one cluster
    submit theirs, each to SUCCEEDED on the student pool."""
    from meal_ray.config import load_config
    from meal_ray.serve.lifecycle import teachers_down, teachers_up

    sizes = sorted(PAPER)
    roots = {size: write_imagenet_folder(tmp_path / f"imagenet-{size}", size) for size in sizes}
    jobs = {size: load_config(ROOT / "jobs" / PAPER[size][1], overrides=[*job_overrides(size, roots[size])])
            for size in sizes}
    serve_file = tmp_path / "paper-teachers.yaml"
    both = yaml.safe_load((ROOT / "deployments" / PAPER[sizes[0]][0]).read_text())
    both["applications"] = [rehearsal_app(size, roots[size]) for size in sizes]
    serve_file.write_text(yaml.safe_dump(both, sort_keys=False))
    status = teachers_up(serve_file, log=lambda s: None)
    submitted: dict = {}
    try:
        for size in sizes:
            assert status[app_name(size)]["status"] == "RUNNING", status
            # two teachers + ingress, all on the teacher pool
            assert sorted(cluster.actor_pools(f"ServeReplica:{app_name(size)}:")) == ["teachers"] * 3
            check_replicas(cluster, size, roots[size], jobs[size])
        submitted = {size: submit(cluster, tmp_path / f"job-{size}", size, roots[size]) for size in sizes}
        finished = {size: (proc.communicate(timeout=900)[0], proc.returncode) for size, proc in submitted.items()}
    finally:
        for size in sizes:
            teachers_down(app_name(size))
        for proc in submitted.values():
            if proc.poll() is None:
                proc.kill()
    for size in sizes:
        stdout, code = finished[size]
        assert code == 0 and "succeeded" in stdout, f"{size} px:\n{stdout[-4000:]}"
        check_job(size, stdout, tmp_path / f"job-{size}", jobs[size])


def job_overrides(size: int, data_root: Path) -> list:
    return [f"data.root={data_root}", f"teachers.app_name={app_name(size)}", *JOB_OVERRIDES]


def check_replicas(cluster, size: int, data_root: Path, job) -> None:
    """Every teacher replica of the ``size`` px ensemble built its architecture and its own timm preprocessing, and
    answers a pixel request and a crop-box request with what the same network built here answers."""
    from ray import serve
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    from meal_ray.config import TeacherSpec
    from meal_ray.data.datasets import load_train_set
    from meal_ray.ensemble import load_teacher
    from meal_ray.serve.protocol import CropRequest, TeacherRequest

    dataset = load_train_set("imagefolder", str(data_root), 3)
    batch = recorded_batch(dataset, 2, size=job.data.image_size, scale=job.data.crop_scale, seed=size)
    teachers = yaml.safe_load((ROOT / "deployments" / PAPER[size][0]).read_text())["applications"][0]["args"][
        "teachers"]
    assert [t["model"] for t in teachers] == [t.model for t in job.teachers.models]
    footprint = {}
    for t in teachers:
        handle = serve.get_deployment_handle(t["name"], app_name=app_name(size))
        info = handle.info.remote().result(timeout_s=120)
        timm_cfg = resolve_data_config(pretrained_cfg=get_pretrained_cfg(t["model"]).to_dict())
        assert (info["model"], info["pretrained"], info["num_classes"]) == (t["model"], False, CLASSES)
        assert info["input_size"] == [3, size, size] == list(timm_cfg["input_size"]), info
        assert info["interpolation"] == timm_cfg["interpolation"] == "bicubic"
        np.testing.assert_allclose(info["mean"], timm_cfg["mean"], atol=1e-6)
        np.testing.assert_allclose(info["std"], timm_cfg["std"], atol=1e-6)
        local = load_teacher(TeacherSpec(model=t["model"]))(batch.images).numpy()
        from_pixels = handle.remote(TeacherRequest.from_images(batch.images)).result(timeout_s=300)
        from_boxes = handle.remote(CropRequest.from_batch(batch)).result(timeout_s=300)
        assert from_pixels.shape == (2, CLASSES)
        np.testing.assert_allclose(from_pixels, local, atol=1e-4, rtol=0)
        np.testing.assert_allclose(from_boxes, local, atol=1e-4, rtol=0)
        footprint[t["model"]] = replica_footprint(cluster, app_name(size), handle, t["name"],
                                                  batch.images[0].numpy())
    print(f"\n[paper {size} px] one replica on this machine's CPU: {json.dumps(footprint)}")


def submit(cluster, work: Path, size: int, data_root: Path) -> subprocess.Popen:
    """The paper's job, submitted as a user submits it (`ray job submit`, which follows the job to its end)."""
    job_file, repo = PAPER[size][1], work / "repo"
    (repo / "jobs").mkdir(parents=True)
    shutil.copy(ROOT / "jobs" / job_file, repo / "jobs" / job_file)
    sets = " ".join(f"--set {s}" for s in job_overrides(size, data_root))
    command = (f"{BIN}/ray job submit --working-dir {repo} -- meal-ray distill --config jobs/{job_file} {sets} "
               f"--output {work / 'run'} --tracking-uri sqlite:///{work / 'mlflow.db'}")
    env = dict(os.environ, RAY_ADDRESS=cluster.dashboard, PATH=f"{BIN}:{os.environ.get('PATH', '')}",
               RAY_AUTH_MODE="token")
    return subprocess.Popen(command.split(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def check_job(size: int, stdout: str, work: Path, job) -> None:
    """What the job wrote: one rehearsal epoch of the paper's schedule from the served ensemble, the discriminator's
    paper widths, and the config's own settings in MLflow."""
    from mlflow.tracking import MlflowClient

    from meal_ray.train.worker import load_state

    out = work / "run"
    assert "[meal-ray] epoch 1/180 | loss" in stdout and "done: top-1" in stdout, stdout[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["count"] == 8 and metrics["history"][0]["teacher_latency_ms"] > 0
    served = json.loads((out / "run.json").read_text())["served_teacher_set"]
    assert [t["model"] for t in served["teachers"]] == [t.model for t in job.teachers.models]
    state = load_state(max(p for p in (out / "ray" / "train").glob("checkpoint_*") if p.is_dir()))
    widths = [tuple(state["discriminator"][f"net.{i}.weight"].shape) for i in (0, 2, 4)]
    assert widths == [(125, 1000), (15, 125), (2, 15)], widths  # 1000 -> 125 -> 15 -> 2
    params = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}").get_run(
        metrics["mlflow_run_id"]).data.params
    config_own = {"optim.epochs": "180", "optim.lr": "0.01", "optim.lr_milestones": "[100]", "optim.d_lr": "0.0001",
                  "data.image_size": str(size), "data.crop_scale": "[0.08, 1.0]", "data.crop_pct": "0.875",
                  "loss.discriminator": "reference", "student.model": "resnet50",
                  "run.label_selector.meal-ray.io/pool": "students"}
    assert {k: params.get(k) for k in config_own} == config_own
