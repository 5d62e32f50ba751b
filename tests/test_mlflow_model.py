"""MLflow as its users expect: the student as an MLflow model (loadable, registered), runs with their dataset and
teachers, model-training experiments, the demo as a parent run with nested stages, readable metric names."""

from __future__ import annotations

import json
import re
import socket

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import FMNIST_DATA, local_distill_job

READABLE = re.compile(r"^[A-Za-z0-9_.\-/ ]+$")


def _fashion_mnist_images(data_config: dict, n: int = 256):
    """The first ``n`` real Fashion-MNIST test images, preprocessed as the export's config.json says (resize, crop,
    normalize: what a timm model takes)."""
    from torch.utils.data import DataLoader

    from meal_ray.config import DataConfig
    from meal_ray.data import EvalTransform, EvalView, load_datasets
    from meal_ray.data.loaders import Normalize

    cfg = DataConfig(**dict(FMNIST_DATA, val_subset=n))
    _, val, _ = load_datasets(cfg, 10)
    loader = DataLoader(EvalView(val, EvalTransform(data_config["input_size"][-1], cfg.crop_pct, cfg.interpolation)),
                        batch_size=n)
    images, labels = next(iter(loader))
    return Normalize(data_config["mean"], data_config["std"])(images), labels


@pytest.mark.slow
def test_distill_logs_a_loadable_registered_mlflow_model(tmp_path, ray_cluster, tiny_teachers, monkeypatch):
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    from meal_ray.cli import main
    from meal_ray.models import load_export, read_export_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    job = local_distill_job("fmnist-distill", tiny_teachers, epochs=1, train_subset=512, val_subset=500,
                            experiment="fmnist")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["distill", "--config", str(tmp_path / "job.yaml"), "--output", str(out),
                                    "--register", "fmnist-student"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["registered_model"] == "fmnist-student" and metrics["registered_model_version"] == 1

    client = MlflowClient(uri)
    run = client.get_run(metrics["mlflow_run_id"])
    # the experiment opens as model training, not as a GenAI app
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    # the teacher set and the data: tags and run inputs
    assert run.data.tags["meal_ray.teachers"] == "test_resnet, resnet10t"
    assert run.data.tags["meal_ray.dataset"] == "fashion-mnist" and run.data.tags["meal_ray.mode"] == "distill"
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in run.inputs.dataset_inputs}
    assert inputs == {"fashion-mnist/train": {"mlflow.data.context": "training"},
                      "fashion-mnist/val": {"mlflow.data.context": "evaluation"}}
    assert all(READABLE.match(k) for k in run.data.metrics), sorted(run.data.metrics)
    assert "val_acc/Ankle boot" in run.data.metrics and "val_top1" in run.data.metrics

    # the run's output is the logged model, with a signature and an input example from the data config
    model_id = run.outputs.model_outputs[0].model_id
    assert metrics["mlflow_model_uri"] == f"models:/{model_id}"
    logged = client.get_logged_model(model_id)
    assert logged.name == "student" and logged.source_run_id == run.info.run_id and str(logged.status) == "READY"
    info = mlflow.models.get_model_info(f"models:/{model_id}")
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 28, 28)
    assert info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 10)
    assert info.saved_input_example_info is not None
    assert info.metadata["label_names"][:2] == ["T-shirt/top", "Trouser"]

    # registered: version 1 of fmnist-student points at this run's model
    (version,) = client.search_model_versions("name='fmnist-student'")
    assert str(version.version) == "1" and version.run_id == run.info.run_id and version.source == f"models:/{model_id}"

    # mlflow.pytorch.load_model gives the timm student back; it predicts what the safetensors export predicts
    export = out / "student"
    images, labels = _fashion_mnist_images(read_export_config(export)["pretrained_cfg"])
    with torch.no_grad():
        expected = load_export(export)(images)
        for uri_ in (f"models:/{model_id}", "models:/fmnist-student/1", f"runs:/{run.info.run_id}/student"):
            loaded = mlflow.pytorch.load_model(uri_).eval()
            got = loaded(images)
            assert torch.equal(got.argmax(1), expected.argmax(1)), uri_
            assert torch.allclose(got, expected, atol=1e-5), uri_
    assert type(loaded).__name__ == "EfficientNet"
    pyfunc = mlflow.pyfunc.load_model("models:/fmnist-student/1")  # the serving path: numpy in, logits out
    assert np.array_equal(np.asarray(pyfunc.predict(images.numpy())).argmax(1), expected.argmax(1).numpy())
    # the safetensors export is still there and unchanged in form
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors"]

    # a second run with the same name is version 2
    res = CliRunner().invoke(main, ["distill", "--config", str(tmp_path / "job.yaml"), "--output", str(out),
                                    "--overwrite", "--set", "run.register_model=fmnist-student"])
    assert res.exit_code == 0, res.output
    assert sorted(str(v.version) for v in client.search_model_versions("name='fmnist-student'")) == ["1", "2"]


@pytest.mark.slow
def test_demo_stages_are_nested_runs_of_the_demo_run_and_reused_stages_stay_linked(tmp_path, ray_cluster):
    from mlflow.tracking import MlflowClient

    from meal_ray.demo.stages import _stage_config, open_demo_run, run_stage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "demo"
    out.mkdir()
    lines: list = []
    preset = dict(subset=512, val_subset=500, batch=128)
    parent = open_demo_run(uri, "demo-test", {"seeds": "0"}, {"meal_ray.mode": "demo"}, out, lines.append)
    cfg = _stage_config("teacher-test_resnet", "pretrain", out, "test_resnet", 1, preset, 0, uri)
    trained = run_stage(cfg, lines.append, parent.run_id)
    parent.end()
    # the demo again: the stage is finished, so it is reused, and linked under the new demo run
    again = open_demo_run(uri, "demo-test", {"seeds": "0"}, {"meal_ray.mode": "demo"}, out, lines.append)
    reused = run_stage(cfg, lines.append, again.run_id)
    again.end()
    assert reused == trained and sum("reusing finished stage" in line for line in lines) == 1

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("meal-ray-demo")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    def children(parent_id):
        return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")

    (first,) = children(parent.run_id)
    assert first.info.run_id == trained["mlflow_run_id"] and first.info.run_name == "teacher-test_resnet"
    assert first.data.tags["meal_ray.stage"] == "teacher-test_resnet" and first.info.status == "FINISHED"
    assert {d.dataset.name for d in first.inputs.dataset_inputs} == {"fashion-mnist/train", "fashion-mnist/val"}
    (link,) = children(again.run_id)
    assert link.info.run_name == "teacher-test_resnet (reused)" and link.info.status == "FINISHED"
    assert link.data.tags["meal_ray.reused_run_id"] == trained["mlflow_run_id"]
    assert link.data.metrics["final_top1"] == pytest.approx(trained["top1"])
    assert link.data.params["optim.epochs"] == "1"
    # the parent runs are top-level runs of the same experiment
    for run_id in (parent.run_id, again.run_id):
        run = client.get_run(run_id)
        assert "mlflow.parentRunId" not in run.data.tags and run.info.status == "FINISHED"
        assert run.info.experiment_id == exp.experiment_id


# --------------------------------------------------------------------------- names and plots (no Ray)


def _results(seeds):
    from meal_ray.demo.report import CONTROL, MEAL

    rows = ["resnet18", "teacher ensemble", "student init", CONTROL, MEAL]
    stat = {"mean": 80.0, "std": 0.5}
    per_class = {"T-shirt/top": 70.0, "Ankle boot": 95.0}
    return {"seeds": seeds,
            "summary": [{"model": m, "top1": stat, "top5": stat, "nll": stat, "ece": stat} for m in rows],
            "gain_over_control": stat,
            "runs": [{"per_class": {CONTROL: per_class, MEAL: per_class}} for _ in seeds]}


def test_demo_metric_names_are_readable():
    from meal_ray.demo.report import demo_metrics
    from meal_ray.tracking import metric_key

    one = demo_metrics(_results([0]))
    assert {"top1/meal_v2", "top1/control", "top1/teacher_ensemble", "top1/student_init", "top1/resnet18",
            "top5/meal_v2", "nll/meal_v2", "ece/teacher_ensemble", "gain_over_control_mean",
            "test_acc/meal_v2/T-shirt-top", "test_acc/control/Ankle boot"} <= set(one)
    assert not any(k.startswith("top1_std/") for k in one)  # one seed: no spread to report
    assert "top1_std/meal_v2" in demo_metrics(_results([0, 1]))
    assert all(READABLE.match(k) and "(" not in k for k in one)
    assert metric_key("MEAL V2 (soft-label cache)") == "meal_v2_soft-label_cache"


def test_one_seed_reads_seed_0_not_a_mean():
    from meal_ray.demo.report import format_summary, gain_over_control, seeds_text, summarize

    assert seeds_text([0]) == "seed 0" and seeds_text([0, 1, 2]) == "mean over seeds 0, 1, 2"
    rows = [{"model": m, "arch": "a", "params": 1e6, "top1": t, "top5": 99.0, "gap_to_ensemble": 0.0,
             "similar_classes": 1.0, "dissimilar_classes": 1.0, "nll": 0.5, "ece": 2.0}
            for m, t in (("control (hard labels)", 80.0), ("MEAL V2 (ensemble soft labels)", 81.0))]
    summary = summarize([{"rows": rows}])
    text = format_summary(summary, gain_over_control(summary), [0])
    assert text.startswith("Fashion-MNIST test set (10000 images), seed 0\n") and "mean" not in text.split("\n")[0]


def test_plots_whole_epochs_one_class_order_and_one_colour_per_series(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from meal_ray import plots
    from meal_ray.demo.report import COLORS, CONTROL, MEAL

    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)  # keep each figure to look at
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_top1": 80.0 + e, "train_top1": 79.0 + e} for e in (1, 2, 3)]
    plots.plot_training_curves(history, tmp_path / "curves.png")
    plots.plot_arms({CONTROL: {0: history}, MEAL: {0: history}}, tmp_path / "arms.png",
                    reference={"teacher ensemble": 85}, colors=COLORS)
    for fig in figures:
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks == [1, 2, 3], ticks
    classes = ["T-shirt/top", "Trouser", "Ankle boot"]
    acc = {"Ankle boot": 97.0, "T-shirt/top": 81.0, "Trouser": 95.0}  # a mapping in another order
    plots.plot_per_class(classes, {CONTROL: acc, MEAL: acc, "teacher ensemble": acc}, tmp_path / "a.png",
                         colors=COLORS)
    plots.plot_per_class(classes, {MEAL: acc}, tmp_path / "b.png", colors=COLORS)
    arms_lines = {line.get_label(): to_hex(line.get_color()) for line in figures[1].axes[0].get_lines()}
    for fig in figures[2:]:
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == classes
        for container in ax.containers:
            name = container.get_label()
            assert to_hex(container.patches[0].get_facecolor()) == COLORS[name]  # the same colour in every plot
            assert [p.get_height() for p in container.patches] == [81.0, 95.0, 97.0]  # in the classes' order
    assert arms_lines[MEAL] == COLORS[MEAL] and arms_lines["teacher ensemble"] == COLORS["teacher ensemble"]
    loss_lines = {line.get_label(): list(line.get_ydata()) for line in figures[1].axes[1].get_lines()}
    assert loss_lines == {CONTROL: [1.0, 0.5, 1 / 3], MEAL: [1.0, 0.5, 1 / 3]}  # the training loss beside top-1
    assert plots.color_of("resnet18") == plots.color_of("resnet18")  # unnamed series: a fixed colour from the name

    # ImageNet's 1000 classes: the first series' 20 weakest and 20 strongest classes, ranked, the other series beside
    many = [f"n{c:08d}" for c in range(1000)]
    first = [float((c * 7919) % 1000) / 10 for c in range(1000)]  # each class its own accuracy, in no order
    plots.plot_per_class(many, {MEAL: first, CONTROL: [100 - v for v in first]}, tmp_path / "many.png")
    ax = figures[-1].axes[0]
    shown = [t.get_text() for t in ax.get_xticklabels()]
    ranked = sorted(many, key=lambda c: first[many.index(c)])
    assert shown == ranked[:20] + ranked[-20:]
    assert [p.get_height() for p in ax.containers[0].patches] == [first[many.index(c)] for c in shown]
    assert [p.get_height() for p in ax.containers[1].patches] == [100 - first[many.index(c)] for c in shown]
    assert f"the 20 lowest and 20 highest of 1000 classes by {MEAL}'s accuracy" in ax.get_title()
    assert figures[-1].get_size_inches()[0] * 110 < 4000  # a figure one can open: 40 groups, not 1000
    plt.close("all")


@pytest.mark.slow
def test_a_model_logged_while_mlflow_is_away_is_kept_and_sent_later(tmp_path, monkeypatch):
    import mlflow.pytorch
    from conftest import FMNIST_DATA_CONFIG
    from mlflow.tracking import MlflowClient

    from meal_ray.models import create_model, export_model, load_export
    from meal_ray.tracking import PENDING_FILE, Tracker, sync_pending

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = Tracker(uri).start("away", "run", {"a": 1})
    export = export_model(create_model("test_efficientnet", num_classes=10, in_chans=1).eval(), tmp_path / "student",
                          FMNIST_DATA_CONFIG, label_names=[str(i) for i in range(10)])
    with socket.socket() as s:  # a port nobody answers on: the server is away
        s.bind(("127.0.0.1", 0))
        away = f"http://127.0.0.1:{s.getsockname()[1]}"
    messages: list = []
    tracker = Tracker(away, run_id, log=messages.append, spool_dir=tmp_path)
    assert tracker.log_model(export, registered_model_name="away-student") is None
    assert json.loads((tmp_path / PENDING_FILE).read_text())["kind"] == "model" and "kept in" in messages[0]
    assert sync_pending(tmp_path, uri, log=messages.append) == 1 and not (tmp_path / PENDING_FILE).exists()
    (version,) = MlflowClient(uri).search_model_versions("name='away-student'")
    assert version.run_id == run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(mlflow.pytorch.load_model("models:/away-student/1")(x), load_export(export)(x))
    # a model the registry refuses is said once and dropped: it never holds back the run's later records
    sqlite = Tracker(uri, run_id, log=messages.append, spool_dir=tmp_path)
    assert sqlite.log_model(tmp_path / "no-such-export") is None
    assert "not logged as an MLflow model" in messages[-1] and not (tmp_path / PENDING_FILE).exists()
    sqlite.end()
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
