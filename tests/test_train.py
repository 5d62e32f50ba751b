"""Ray Train jobs on a real local cluster: distill from served and local teachers, resume, MLflow, export."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import FMNIST_DATA

from meal_ray.config import load_config
from meal_ray.errors import ConfigError, OutputDirError, TeachersNotRunningError

pytestmark = pytest.mark.slow

APP = "meal-ray-train-test-teachers"


def job(tmp_path, name, teachers, source, epochs=1, **over):
    return load_config(data=dict(
        name=name, mode="distill",
        data=dict(FMNIST_DATA, train_subset=1024, val_subset=500),
        student=dict(model="test_efficientnet", num_classes=10),
        teachers=dict(source=source, app_name=APP, prefetch=3,
                      models=[{"model": t["model"], "weights": t["weights"]} for t in teachers]),
        optim=dict(dict(epochs=epochs, batch_size=128, lr=0.05), **over.pop("optim", {})),
        run=dict(dict(num_workers=2, cpus_per_worker=1, seed=7, output=str(tmp_path / name),
                      tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", log_every=0), **over.pop("run", {})),
        **over))


@pytest.fixture(scope="module")
def served_teachers(ray_cluster, tiny_teachers):
    from ray import serve

    from meal_ray.serve.app import build_app

    app = build_app({"teachers": tiny_teachers, "max_batch_size": 256, "batch_wait_timeout_s": 0.005})
    serve.run(app, name=APP, route_prefix=None)
    yield tiny_teachers
    serve.delete(APP)


def test_served_and_local_distillation_agree_and_track_everything(tmp_path, served_teachers):
    from mlflow.tracking import MlflowClient

    from meal_ray.evaluation import evaluate_export
    from meal_ray.train import run_job

    served = run_job(job(tmp_path, "served", served_teachers, "served"))
    local = run_job(job(tmp_path, "local", served_teachers, "local"))
    s_hist, l_hist = served["history"][0], local["history"][0]
    # same seed, same crops, same init: the first step's loss matches (fp16 replies from Serve)
    assert s_hist["first_step_loss"] == pytest.approx(l_hist["first_step_loss"], rel=2e-3)
    assert "teacher_wait_frac" in s_hist and s_hist["teacher_latency_ms"] > 0
    assert "disc_loss" in s_hist and s_hist["soft_ce"] > 0

    # MLflow holds params, per-epoch metrics, per-class accuracy and artifacts
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(served["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["teachers.source"] == "served"
    for key in ("soft_ce", "disc_loss", "val_top1", "val_top5", "train_top1", "images_per_s",
                "teacher_wait_frac", "teacher_latency_ms"):
        assert key in run.data.metrics, key
    assert run.data.metrics["final_top1"] == pytest.approx(served["top1"])
    assert run.data.metrics["val_acc/Trouser"] == pytest.approx(served["per_class"]["Trouser"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "training_curves.png", "per_class.png", "student"} <= artifacts

    # the export loads into a fresh timm model and reproduces the reported top-1
    result, _ = evaluate_export(str(tmp_path / "served" / "student"), val_subset=500)
    assert result.top1 == pytest.approx(served["top1"], abs=1e-6)
    metrics_file = json.loads((tmp_path / "served" / "metrics.json").read_text())
    assert metrics_file["top1"] == served["top1"] and set(metrics_file["per_class"]) >= {"Shirt", "Coat"}


def test_crop_box_requests_train_like_local_teachers(tmp_path, ray_cluster, tiny_teachers):
    """teachers.request=crops end to end: the workers send crop records, the replica (28 px, the student's size)
    renders them from the dataset; the first step's loss is the in-process teacher's."""
    from ray import serve

    from meal_ray.serve.app import build_app
    from meal_ray.train import run_job

    app = APP + "-crops"
    serve.run(build_app({"teachers": tiny_teachers[:1], "data": {"dataset": "fashion-mnist"}}), name=app,
              route_prefix=None)
    try:
        cfg = job(tmp_path, "crops", tiny_teachers[:1], "served", optim=dict(cutmix=True))
        cfg.teachers.app_name, cfg.teachers.request = app, "crops"
        crops = run_job(cfg)
    finally:
        serve.delete(app)
    local = run_job(job(tmp_path, "local", tiny_teachers[:1], "local", optim=dict(cutmix=True)))
    assert crops["history"][0]["first_step_loss"] == pytest.approx(local["history"][0]["first_step_loss"], rel=2e-3)


def test_a_job_whose_teachers_are_not_the_served_ones_stops_before_training(tmp_path, served_teachers):
    from meal_ray.errors import TeacherSetMismatchError
    from meal_ray.train import run_job

    swapped = job(tmp_path, "swapped", served_teachers[::-1], "served")
    with pytest.raises(TeacherSetMismatchError, match=r"serves other teachers than the job's teachers.models "
                                                      r".*teacher 0 model: job resnet10t, served test_resnet"):
        run_job(swapped)
    one = job(tmp_path, "one", served_teachers[:1], "served")
    with pytest.raises(TeacherSetMismatchError, match=r"job has 1 teachers \(test_resnet\), served has 2"):
        run_job(one)
    crops = job(tmp_path, "crops", served_teachers, "served")
    crops.teachers.request = "crops"  # this app was deployed without args.data
    with pytest.raises(ConfigError, match=r"teachers.request=crops, but the Serve application .* reads no dataset"):
        run_job(crops)
    assert not any((tmp_path / n).exists() for n in ("swapped", "one", "crops"))  # nothing written


def _resumed_momentum_norm(lines: list) -> float:
    """The optimizer momentum norm the resumed workers logged ("resumed from checkpoint at epoch N (optimizer
    momentum norm X, as saved)")."""
    found = [re.search(r"resumed from checkpoint at epoch \d+ \(optimizer momentum norm ([0-9.e+-]+)", line)
             for line in lines]
    norms = {float(m.group(1)) for m in found if m}
    assert len(norms) == 1, lines  # every rank restored the same optimizer
    return norms.pop()


def test_stopped_run_resumes_at_next_epoch_with_optimizer_state(tmp_path, ray_cluster, tiny_teachers):
    from meal_ray.train import STATE_FILE, run_job

    first = run_job(job(tmp_path, "resume", tiny_teachers, "local", epochs=1))
    assert [h["epoch"] for h in first["history"]] == [1]
    ckpts = sorted(p for p in (tmp_path / "resume" / "ray" / "train").glob("checkpoint_*") if p.is_dir())
    state = torch.load(ckpts[-1] / STATE_FILE, weights_only=False)
    saved_norm = (sum(float(s["momentum_buffer"].double().pow(2).sum())
                      for s in state["optimizer"]["state"].values())) ** 0.5
    assert saved_norm > 0

    with pytest.raises(OutputDirError, match="--resume"):
        run_job(job(tmp_path, "resume", tiny_teachers, "local", epochs=2))
    with pytest.raises(OutputDirError, match="different config"):
        run_job(job(tmp_path, "resume", tiny_teachers, "local", epochs=2, loss={"discriminator": "off"}), resume=True)

    said: list = []
    second = run_job(job(tmp_path, "resume", tiny_teachers, "local", epochs=2), resume=True, log=said.append)
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    assert second["history"][1]["start_epoch"] == 1  # the resumed run started at epoch 2 (index 1)
    assert _resumed_momentum_norm(said) == pytest.approx(saved_norm, rel=1e-9)  # momentum buffers restored
    assert second["epochs"] == 2

    # another worker count (the same global batch on 1 worker): it continues from epoch 3 and says that the streams
    # cannot continue as they were; the checkpoint it starts from is the 2-worker run's last
    said = []
    ckpts = sorted(p for p in (tmp_path / "resume" / "ray" / "train").glob("checkpoint_*") if p.is_dir())
    saved = torch.load(ckpts[-1] / STATE_FILE, weights_only=False)
    assert len(saved["rng_per_rank"]) == 2 and saved["epoch"] == 2
    third = run_job(job(tmp_path, "resume", tiny_teachers, "local", epochs=3, run=dict(num_workers=1)),
                    resume=True, log=said.append)
    assert [h["epoch"] for h in third["history"]] == [1, 2, 3] and third["history"][2]["start_epoch"] == 2
    assert _resumed_momentum_norm(said) == pytest.approx(
        sum(float(s["momentum_buffer"].double().pow(2).sum()) for s in saved["optimizer"]["state"].values()) ** 0.5,
        rel=1e-9)
    assert any("checkpoint written by 2 worker(s), resumed with 1" in line for line in said), said
    ckpts = sorted(p for p in (tmp_path / "resume" / "ray" / "train").glob("checkpoint_*") if p.is_dir())
    assert len(torch.load(ckpts[-1] / STATE_FILE, weights_only=False)["rng_per_rank"]) == 1


def test_served_source_without_teachers_says_how_to_start_them(tmp_path, ray_cluster, tiny_teachers):
    from meal_ray.train import run_job

    cfg = job(tmp_path, "noteachers", tiny_teachers, "served")
    cfg.teachers.app_name = "no-such-teacher-app"
    with pytest.raises(TeachersNotRunningError, match="meal-ray teachers up"):
        run_job(cfg)


def test_class_count_mismatch_and_unknown_key(tmp_path, ray_cluster, tiny_teachers):
    from meal_ray.errors import ClassCountMismatchError
    from meal_ray.sources.local import LocalSoftLabels

    cfg = job(tmp_path, "mismatch", tiny_teachers, "local")
    cfg.student.num_classes = 12
    with pytest.raises(ClassCountMismatchError, match="student.num_classes=10"):
        LocalSoftLabels.from_config(cfg, "cpu")
    with pytest.raises(ConfigError, match="unknown config key 'optim.lr_sched'"):
        load_config(data=dict(data=FMNIST_DATA, optim={"lr_sched": "cosine"}, teachers={"models": ["x"]}))
