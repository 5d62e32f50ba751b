"""The user's own data: an ImageNet-layout folder of real images (Fashion-MNIST items as PNG and JPEG, some saved as
RGB) through `meal-ray pretrain`, `meal-ray distill` (local teachers) and `meal-ray evaluate --dataset imagefolder`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import json_line, write_fashion_mnist_folder
from PIL import Image

from meal_ray.cli import main
from meal_ray.config import DataConfig
from meal_ray.data import FASHION_MNIST_CLASSES, ImageFolderUint8, load_datasets
from meal_ray.errors import DatasetError

FOLDERS = [c.replace("/", "-") for c in FASHION_MNIST_CLASSES]  # "T-shirt-top": a class name is a folder name


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_fashion_mnist_folder(tmp_path_factory.mktemp("my-dataset"), FOLDERS, 80, 20)


def test_folder_images_are_converted_to_the_configured_channels(image_folder, tmp_path):
    gray = ImageFolderUint8(image_folder / "val", channels=1)
    rgb = ImageFolderUint8(image_folder / "val", channels=3)
    assert gray.classes == tuple(sorted(FOLDERS)) and len(gray) == 200
    kinds = set()
    for i in range(12):  # PNG and JPEG, grayscale and RGB files
        g, label = gray[i]
        c, _ = rgb[i]
        assert g.shape == (1, 28, 28) and c.shape == (3, 28, 28) and g.dtype == c.dtype == torch.uint8
        assert torch.equal(c[0], c[1]) and torch.equal(c[1], c[2])  # grayscale replicated to RGB
        path = gray.folder.samples[i][0]
        with Image.open(path) as im:
            kinds.add((path.rsplit(".", 1)[1], im.mode))
            if im.mode == "L":
                assert torch.equal(g[0], torch.from_numpy(np.array(im)))
    assert {"png", "jpg"} <= {k for k, _ in kinds} and {"L", "RGB"} <= {m for _, m in kinds}
    # an RGB job on the same folder: three channels, the dataset's class names
    train, val, classes = load_datasets(DataConfig(dataset="imagefolder", root=str(image_folder), mean=(0.5,) * 3,
                                                   std=(0.5,) * 3), 10)
    assert val[0][0].shape == (3, 28, 28) and classes == tuple(sorted(FOLDERS))

    with pytest.raises(DatasetError, match="1 \\(grayscale\\) or 3 \\(RGB\\) channels, not 2"):
        ImageFolderUint8(image_folder / "val", channels=2)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="one subfolder per class"):
        ImageFolderUint8(tmp_path / "empty" / "train")
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolderUint8(tmp_path / "nowhere")
    bad = tmp_path / "bad" / "cls"
    bad.mkdir(parents=True)
    (bad / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="cannot read image .*broken.png"):
        ImageFolderUint8(tmp_path / "bad")[0]


def _job(path, mode, model, root, teachers=None, epochs=2):
    path.write_text(yaml.safe_dump(dict(
        name=path.stem, mode=mode,
        data=dict(dataset="imagefolder", root=str(root), image_size=28, crop_scale=[0.6, 1.0], crop_pct=1.0,
                  mean=[0.2860], std=[0.3530]),
        student=dict(model=model, num_classes=10),
        teachers=dict(source="local", models=teachers) if teachers else dict(source="none"),
        optim=dict(epochs=epochs, batch_size=50, lr=0.05, lr_schedule="cosine"),
        run=dict(num_workers=1, cpus_per_worker=1, log_every=0))))
    return str(path)


@pytest.mark.slow
def test_own_folder_pretrain_distill_evaluate_with_the_cli(image_folder, tmp_path, ray_cluster):
    runner, uri = CliRunner(), f"sqlite:///{tmp_path / 'mlflow.db'}"

    def cli(*args):
        result = runner.invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    teacher_job = _job(tmp_path / "teacher.yaml", "pretrain", "resnet10t", image_folder, epochs=3)
    cli("pretrain", "--config", teacher_job, "--output", str(tmp_path / "teacher"), "--tracking-uri", uri)
    teacher = {"model": "resnet10t", "weights": str(tmp_path / "teacher" / "student")}
    student_job = _job(tmp_path / "student.yaml", "distill", "test_efficientnet", image_folder, [teacher])
    cli("distill", "--config", student_job, "--output", str(tmp_path / "student"), "--tracking-uri", uri)

    for run in ("teacher", "student"):
        metrics = json.loads((tmp_path / run / "metrics.json").read_text())
        assert list(metrics["per_class"]) == sorted(FOLDERS) and metrics["count"] == 200  # the folder's class names
        out = cli("evaluate", "--model", str(tmp_path / run / "student"), "--dataset", "imagefolder",
                  "--root", str(image_folder), "--json", "--reliability", str(tmp_path / f"{run}.png"))
        result = json_line(out)
        assert result["top1"] == pytest.approx(metrics["top1"], abs=1e-9), run
        # calibration: the export re-evaluated gives the run's own NLL and ECE, and draws its reliability diagram
        assert (result["nll"], result["ece"]) == pytest.approx((metrics["nll"], metrics["ece"]), rel=1e-4), run
        assert 0 < result["ece"] < 1 and (tmp_path / f"{run}.png").stat().st_size > 1000
        assert (result["per_class"] == pytest.approx(metrics["per_class"])
                and list(result["per_class"]) == sorted(FOLDERS))
    assert json.loads((tmp_path / "teacher" / "metrics.json").read_text())["top1"] > 50  # it learned from the folder
    history = json.loads((tmp_path / "student" / "metrics.json").read_text())["history"]
    assert history[-1]["soft_ce"] < history[0]["soft_ce"] and "disc_loss" in history[0]

    text = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "student" / "student"), "--dataset",
                                     "imagefolder", "--root", str(tmp_path / "nowhere")]).output
    assert "DatasetError" in text and "does not exist" in text and "Traceback" not in text
