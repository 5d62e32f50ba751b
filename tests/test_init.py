"""`meal-ray init` and the README's "Your own data, end to end" walkthrough, run as written: a folder of real images
(Fashion-MNIST items as PNG and JPEG, some stored as RGB), two teachers trained there and saved as bare state dicts
(.safetensors, .pth), init -> pretrain -> distill (local teachers) -> evaluate reproducing the distill run's top-1."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import json_line, write_fashion_mnist_folder
from PIL import Image

from meal_ray.cli import main
from meal_ray.data import FASHION_MNIST_CLASSES

README = Path(__file__).resolve().parents[1] / "README.md"
# "0-T-shirt-top", "1-Trouser", ...: sorted folder names keep Fashion-MNIST's label order
FOLDERS = [f"{i}-{c.replace('/', '-')}" for i, c in enumerate(FASHION_MNIST_CLASSES)]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_fashion_mnist_folder(tmp_path_factory.mktemp("my-images"), FOLDERS, 30, 10)


def _cli(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _refused(*args) -> str:
    """The command fails with a one-line error (click's, or a MealRayError's), not an exception's traceback."""
    result = _cli(*args, ok=False)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert "Traceback" not in result.output and "Error:" in result.output, result.output
    return " ".join(result.output.split())


def test_init_measures_the_folder_and_writes_configs_that_load(image_folder, tmp_path):
    from meal_ray.config import load_config
    from meal_ray.models import create_model, load_export
    from meal_ray.serve.app import load_serve_config
    from meal_ray.starter import measure_folder

    stats = measure_folder(image_folder)
    assert stats.classes == tuple(FOLDERS) and stats.channels == 1  # RGB-stored gray items: still grayscale
    assert stats.modes.keys() == {"L", "RGB"} and stats.sampled == 300 and stats.median_side == 28
    assert stats.image_size == 32  # 28 rounded up to a multiple of 8
    pixels = torch.cat([torch.from_numpy(np.array(Image.open(p).convert("L"))).flatten()
                        for p in (image_folder / "train").rglob("*.*")]).double() / 255  # as the dataset reads them
    assert stats.mean[0] == pytest.approx(pixels.mean().item(), abs=1e-4)
    assert stats.std[0] == pytest.approx(pixels.std(unbiased=False).item(), abs=1e-4)

    torch.manual_seed(0)
    teacher = create_model("resnet10t", num_classes=10, in_chans=1)
    torch.save({"state_dict": {f"module.{k}": v for k, v in teacher.state_dict().items()}}, tmp_path / "t.pth")
    out = tmp_path / "job"
    text = _cli("init", "--data", image_folder, "--teacher", f"resnet10t={tmp_path / 't.pth'}", "--output", out,
                "--teachers-source", "local").output
    assert "10 classes" in text and "image_size 32" in text
    pretrain, distill = load_config(out / "pretrain.yaml"), load_config(out / "distill.yaml")
    assert pretrain.mode == "pretrain" and distill.mode == "distill" and distill.teachers.source == "local"
    for cfg in (pretrain, distill):
        assert cfg.student.num_classes == 10 and cfg.data.in_chans == 1 and cfg.data.image_size == 32
        assert list(cfg.data.mean) == list(stats.mean) and cfg.data.root == str(image_folder)
    assert distill.student.weights == str(out / "runs" / "pretrain" / "student")
    export = out / "teachers" / "resnet10t"
    assert distill.teachers.models[0].weights == str(export)
    loaded = load_export(export)  # the state dict (DDP prefixes, wrapped) as a timm export with the folder's stats
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), teacher.state_dict().values()))
    assert tuple(loaded.pretrained_cfg["mean"]) == stats.mean and loaded.pretrained_cfg["input_size"] == (1, 32, 32)
    serve = load_serve_config(out / "serve.yaml")  # Ray Serve's ServeDeploySchema + meal-ray's app args
    assert serve.applications[0].name == distill.teachers.app_name
    assert serve.applications[0].args["teachers"][0]["weights"] == str(export)

    again = _refused("init", "--data", image_folder, "--teacher", f"resnet10t={tmp_path / 't.pth'}", "--output", out)
    assert "already exist" in again and "--force" in again
    _cli("init", "--data", image_folder, "--teacher", f"resnet10t={export}", "--output", out, "--force",
         "--student-init", "timm", "--image-size", "48")
    timm_init = load_config(out / "distill.yaml")
    assert timm_init.student.pretrained and timm_init.student.weights is None and timm_init.data.image_size == 48
    assert timm_init.run.label_selector == {}  # one machine: no pools unless asked for

    # --pools: both sides placed for a shared cluster, each on its own pool
    from meal_ray.placement import POOL_LABEL, NodeOffer, serve_demands, unplaceable, worker_demand

    _cli("init", "--data", image_folder, "--teacher", f"resnet10t={export}", "--output", out, "--force", "--pools")
    job = load_config(out / "distill.yaml")
    assert job.run.label_selector == {POOL_LABEL: "students"}
    app = yaml.safe_load((out / "serve.yaml").read_text())["applications"][0]
    assert {d["name"]: d["ray_actor_options"]["label_selector"] for d in app["deployments"]} == {
        "resnet10t": {POOL_LABEL: "teachers"}, "ensemble": {POOL_LABEL: "teachers"}}
    teacher_node = NodeOffer("t", {"CPU": 8}, {POOL_LABEL: "teachers"})
    student_node = NodeOffer("s", {"CPU": 8}, {POOL_LABEL: "students"})
    assert unplaceable(serve_demands(app) + [worker_demand(job.run)], [teacher_node, student_node]) == []
    assert unplaceable([worker_demand(job.run)], [teacher_node]) and unplaceable(serve_demands(app), [student_node])


def test_init_refuses_bad_input_by_name(image_folder, tmp_path):
    torch.manual_seed(0)
    from meal_ray.models import create_model

    rgb = tmp_path / "rgb.safetensors"
    from safetensors.torch import save_file

    save_file(create_model("resnet10t", num_classes=10, in_chans=3).state_dict(), str(rgb))
    base = ["init", "--output", tmp_path / "job"]
    good = f"resnet10t={rgb}"

    def refused(*args):
        return _refused(*base, *args)

    assert "does not exist" in refused("--data", tmp_path / "nowhere", "--teacher", good)
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "val").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "flat" / "train" / "a.png")
    assert "no class subfolders" in refused("--data", tmp_path / "flat", "--teacher", good)
    (tmp_path / "nosplit" / "train" / "a").mkdir(parents=True)
    assert "no val/ subfolder" in refused("--data", tmp_path / "nosplit", "--teacher", good)
    odd = tmp_path / "odd"
    for split, classes in (("train", ("cat", "dog")), ("val", ("cat", "fox"))):
        for c in classes:
            (odd / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(odd / split / c / "a.jpg")
    text = refused("--data", odd, "--teacher", good)
    assert "different class folders" in text and "only in train: dog" in text and "only in val: fox" in text

    data = ["--data", image_folder]
    for bad in ("resnet18", "=x.pth", "resnet18=", "res net=x.pth", "models/r18.pth"):
        text = refused(*data, "--teacher", bad)
        assert "ARCH=PATH" in text or "1000 classes" in text, bad
    assert "1000 classes" in refused(*data, "--teacher", "resnet18")  # a hub teacher for a 10-class folder
    text = refused(*data, "--teacher", f"resnet81={rgb}")
    assert "unknown timm model 'resnet81'" in text and "resnet18" in text
    assert "unknown timm model 'mobilenetv3_smal_050'" in refused(*data, "--teacher", good, "--student",
                                                                 "mobilenetv3_smal_050")
    assert "does not exist" in refused(*data, "--teacher", f"resnet10t={tmp_path / 'missing.pth'}")
    text = refused(*data, "--teacher", good)  # an RGB teacher for a grayscale folder
    assert "does not fit 'resnet10t' with 10 classes and 1 input channel" in text and "conv1.0.weight" in text
    text = refused(*data, "--teacher", f"resnet18={rgb}")  # the wrong architecture for the file
    assert "does not fit 'resnet18'" in text
    assert "give at least one teacher" in refused(*data)
    assert not (tmp_path / "job").exists() or not any((tmp_path / "job").glob("*.yaml"))  # nothing written


def _readme_walkthrough() -> list:
    """The `meal-ray` commands of the README's own-data block, continuation lines joined, comments dropped."""
    text = README.read_text()
    section = text.split("### Your own data, end to end", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.startswith("meal-ray ")]


@pytest.mark.slow
def test_readme_own_data_walkthrough(image_folder, tmp_path, monkeypatch, ray_cluster):
    """The README's commands as written (paths substituted; steps 2-3 shortened with --set), teachers trained here."""
    from safetensors.torch import save_file

    from meal_ray.config import load_config
    from meal_ray.engine import Engine
    from meal_ray.starter import data_section, measure_folder

    steps = _readme_walkthrough()
    assert [s[1] for s in steps] == ["init", "pretrain", "distill", "evaluate"]
    models = tmp_path / "models"
    models.mkdir()
    stats = measure_folder(image_folder)
    for arch, path in ((a, p) for a, p in (s.split("=", 1) for s in steps[0][2:] if "=" in s)):
        # the user's teacher: trained on the folder with hard labels, saved as a bare state dict
        cfg = load_config(data=dict(
            name=arch, mode="pretrain", data=dict(data_section(stats), train_subset=None),
            student=dict(model=arch, num_classes=10), teachers=dict(source="none"),
            optim=dict(epochs=8, batch_size=32, lr=0.05, lr_schedule="cosine"),
            run=dict(log_every=0, channels_last=False)))
        engine = Engine.for_job(cfg, log=lambda s: None)
        engine.fit()
        state = engine.student_raw.state_dict()
        target = models / Path(path).name
        if target.suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in state.items()}, str(target))
        else:
            torch.save(state, target)

    monkeypatch.chdir(tmp_path)  # myjob/ and mlflow.db land here
    fast = {"pretrain": ["--set", "optim.epochs=10", "--set", "optim.batch_size=32", "--set", "optim.lr=0.05"],
            "distill": ["--set", "optim.epochs=2", "--set", "optim.batch_size=32"]}
    outputs = {}
    for step in steps:
        args = [a.replace("/data/my-images", str(image_folder)).replace("/models/", f"{models}/") for a in step[1:]]
        if args[0] == "evaluate":
            args += ["--json", "--reliability", str(tmp_path / "reliability.png")]
        outputs[args[0]] = _cli(*args, *fast.get(args[0], [])).output

    written = yaml.safe_load(Path("myjob/distill.yaml").read_text())
    assert written["teachers"]["source"] == "served" and written["data"]["mean"] == list(stats.mean)
    init_top1 = json.loads(Path("myjob/runs/pretrain/metrics.json").read_text())["top1"]
    metrics = json.loads(Path("myjob/runs/distill/metrics.json").read_text())
    result = json_line(outputs["evaluate"])
    assert result["top1"] == metrics["top1"]  # the exported student gives exactly what the distill run reported
    assert result["per_class"] == metrics["per_class"] and list(result["per_class"]) == FOLDERS
    assert result["count"] == metrics["count"] == 100
    # calibration: the export re-evaluated gives the run's own NLL and ECE, and draws its reliability diagram
    assert (result["nll"], result["ece"]) == pytest.approx((metrics["nll"], metrics["ece"]), rel=1e-4)
    assert 0 < result["ece"] < 1 and (tmp_path / "reliability.png").stat().st_size > 1000
    assert init_top1 > 20 and metrics["top1"] > 20, (init_top1, metrics["top1"])  # learned from the folder (chance 10)
    history = metrics["history"]
    assert "soft_ce" in history[0] and "disc_loss" in history[0]
    missing = _cli("evaluate", "--model", "myjob/runs/distill/student", "--dataset", "imagefolder", "--root",
                   tmp_path / "nowhere", ok=False).output
    assert "DatasetError" in missing and "does not exist" in missing and "Traceback" not in missing
