"""What only a CUDA GPU exercises: fp16 mixed precision and its loss scaler through the Engine. Skipped without one
(CI has none); run on a GPU machine with `python -m pytest tests/test_gpu.py`."""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; must precede CUDA's start

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from meal_ray.config import load_config  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run.amp acts only on one)")

# a start far above what fp16 gradients hold, and growth every 2 clean steps: the scaler skips steps, backs off
# and grows again within two short epochs, so its state at the checkpoint is its own, not a fresh scaler's
SCALER_START = {"scale": 2.0 ** 24, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2,
                "_growth_tracker": 0}


def _image_folder(root, classes=10, train=32, val=4, side=32):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                Image.fromarray(small).resize((side, side), Image.BILINEAR).save(folder / f"{i}.png")
    return root


def _teacher(root):
    """A 10-class teacher with seeded random weights, exported as meal-ray exports its students."""
    from meal_ray.models import create_model, export_model

    torch.manual_seed(1)
    data_config = dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear",
                       crop_pct=1.0)
    return str(export_model(create_model("test_efficientnet", num_classes=10), root, data_config))


def _engine(root, teacher, epochs=2):
    from meal_ray.engine import Engine
    from meal_ray.sources.local import LocalSoftLabels

    cfg = load_config(data=dict(
        name="gpu", mode="distill",
        data=dict(dataset="imagefolder", root=str(root), image_size=32, crop_scale=[0.5, 1.0], crop_pct=1.0,
                  mean=[0.5] * 3, std=[0.25] * 3, loader_workers=0),
        student=dict(model="test_resnet", num_classes=10),
        teachers=dict(source="local", models=[{"model": "test_efficientnet", "weights": teacher}]),
        optim=dict(epochs=epochs, batch_size=32, lr=0.05),
        run=dict(amp="fp16", use_gpu=True, log_every=0, seed=0)))
    return Engine.for_job(cfg, source=LocalSoftLabels.from_config(cfg, "cuda"), device="cuda", log=lambda s: None)


def test_fp16_loss_scaler_is_checkpointed_and_a_resumed_run_repeats_an_undisturbed_one(tmp_path):
    """run.amp=fp16 trains under autocast with a GradScaler; its state (scale, growth tracker) is in the checkpoint,
    and a run stopped after epoch 1 and resumed from that checkpoint in a new Engine ends bit-identical to one that
    never stopped, scaler included."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    root, teacher = _image_folder(tmp_path / "images"), _teacher(tmp_path / "teacher")

    undisturbed = _engine(root, teacher)
    assert undisturbed.amp == "fp16" and undisturbed.scaler is not None
    undisturbed.scaler.load_state_dict(SCALER_START)
    initial = {k: v.clone() for k, v in undisturbed.student_raw.state_dict().items()}
    undisturbed.train_epoch()
    undisturbed.train_epoch()

    first = _engine(root, teacher)
    first.scaler.load_state_dict(SCALER_START)
    first.train_epoch()
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["scaler"]["scale"] != SCALER_START["scale"], "the scaler never moved: the test shows nothing"

    resumed = _engine(root, teacher)
    assert resumed.scaler.state_dict() != state["scaler"]  # a fresh scaler: the restore below is what carries it
    resumed.load_state_dict(state)
    assert resumed.scaler.state_dict() == state["scaler"]
    resumed.train_epoch()

    assert resumed.scaler.state_dict() == undisturbed.scaler.state_dict()
    ends = undisturbed.student_raw.state_dict(), resumed.student_raw.state_dict()
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0]), "resumed weights differ from the undisturbed"
    assert any(not torch.equal(initial[k], ends[0][k]) for k in initial if initial[k].is_floating_point()), \
        "no step was taken: every step overflowed"
    assert all(v.dtype == torch.float32 for v in ends[0].values() if v.is_floating_point())  # fp32 master weights
