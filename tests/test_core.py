"""The MEAL V2 core without Ray: losses, discriminator, ensemble, data, errors, a short distillation."""

from __future__ import annotations

import gzip
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import FMNIST_DATA_CONFIG
from conftest import make_config as _cfg
from torch import nn

from meal_ray.config import TeacherSpec, load_config
from meal_ray.data import (
    CropParams,
    FashionMNIST,
    MixParams,
    RandomCropSampler,
    TrainView,
    read_idx,
    render_crop,
    render_crops,
    render_sample,
    render_samples,
    stratified_indices,
)
from meal_ray.ensemble import TeacherEnsemble
from meal_ray.errors import ClassCountMismatchError, ConfigError, DatasetError, ModelNotFoundError
from meal_ray.losses import discriminator_loss, meal_v2_loss, soft_cross_entropy
from meal_ray.models import Discriminator, create_model, discriminator_widths, export_model, load_export

# ----------------------------------------------------------------------------- losses


def test_soft_cross_entropy_matches_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    probs = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    lse = math.log(math.e ** 1 + math.e ** 2 + math.e ** 3)
    row0 = -(0.2 * (1 - lse) + 0.3 * (2 - lse) + 0.5 * (3 - lse))
    row1 = -math.log(1 / 3)
    assert soft_cross_entropy(logits, probs).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # equals KL(p_e || p_s) + H(p_e)
    kl = F.kl_div(F.log_softmax(logits, 1), probs, reduction="batchmean")
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1).mean()
    assert soft_cross_entropy(logits, probs).item() == pytest.approx((kl + entropy).item(), rel=1e-5)


class LinearDisc(nn.Module):
    """Known 2xC linear map, so BCE and its gradient can be written out by hand."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight))

    def forward(self, x):
        return x @ self.weight.t()


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _bce(o, t):
    return -(t * math.log(_sig(o)) + (1 - t) * math.log(1 - _sig(o)))


def test_discriminator_loss_and_student_gradient_match_hand_computation():
    W = [[1.0, -1.0, 0.5], [0.0, 2.0, -1.0]]
    disc = LinearDisc(W)
    zs = torch.tensor([[0.5, 1.0, -1.0]], requires_grad=True)
    zt = torch.tensor([[2.0, 0.0, 1.0]])
    loss = discriminator_loss(disc, zs, zt)
    os_ = [sum(w * z for w, z in zip(row, [0.5, 1.0, -1.0])) for row in W]  # student row outputs
    ot = [sum(w * z for w, z in zip(row, [2.0, 0.0, 1.0])) for row in W]  # teacher row outputs
    expected = (_bce(os_[0], 1) + _bce(os_[1], 0) + _bce(ot[0], 0) + _bce(ot[1], 1)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d loss / d z_s = W^T (sigmoid(o_s) - target) / 4 : the student is NOT detached
    r = [(_sig(os_[0]) - 1) / 4, (_sig(os_[1]) - 0) / 4]
    grad = [W[0][c] * r[0] + W[1][c] * r[1] for c in range(3)]
    assert zs.grad.tolist()[0] == pytest.approx(grad, rel=1e-5)
    # adversarial option reverses exactly that gradient
    zs2 = zs.detach().clone().requires_grad_(True)
    discriminator_loss(disc, zs2, zt, reverse_student_gradient=True).backward()
    assert zs2.grad.tolist()[0] == pytest.approx([-g for g in grad], rel=1e-5)


def test_discriminator_architecture_and_floor():
    assert discriminator_widths(1000) == (125, 15)
    assert discriminator_widths(10) == (8, 8)
    d = Discriminator(1000)
    linears = [m for m in d.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1000, 125), (125, 15), (15, 2)]
    assert isinstance(d.net[-1], nn.ReLU)  # ReLU after the last layer too (authors' code)
    out = Discriminator(10)(torch.randn(6, 10))
    assert out.shape == (6, 2) and (out >= 0).all()


def test_meal_v2_total_is_sum_and_hard_labels_default_off():
    torch.manual_seed(0)
    zs, zt = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    pt = zt.softmax(1)
    disc = Discriminator(10)
    parts = meal_v2_loss(zs, pt, zt, discriminator=disc, labels=torch.arange(4))
    assert parts.hard_ce is None
    assert parts.total.item() == pytest.approx((parts.soft_ce + parts.disc).item(), rel=1e-6)
    off = meal_v2_loss(zs, pt, zt, discriminator=disc, discriminator_mode="off")
    assert off.disc is None and off.total.item() == pytest.approx(parts.soft_ce.item())
    hard = meal_v2_loss(zs, pt, zt, labels=torch.arange(4), hard_label_weight=0.5)
    assert hard.total.item() == pytest.approx((hard.soft_ce + 0.5 * F.cross_entropy(zs, torch.arange(4))).item(),
                                              rel=1e-6)


# ----------------------------------------------------------------------------- ensemble


def test_ensemble_averages_teachers_with_different_input_sizes(tiny_teachers):
    specs = [TeacherSpec(**t) for t in tiny_teachers]
    ensemble = TeacherEnsemble.from_specs(specs)
    assert [t.size for t in ensemble.teachers] == [(28, 28), (36, 36)]
    crops = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    probs, logits = ensemble(crops)
    by_hand_probs, by_hand_logits = [], []
    for spec, size in zip(tiny_teachers, (28, 36)):
        model = load_export(spec["weights"])
        x = crops.float()
        if size != 28:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = (x / 255 - 0.2860) / 0.3530
        with torch.no_grad():
            z = model(x)
        by_hand_logits.append(z)
        by_hand_probs.append(z.softmax(1))
    torch.testing.assert_close(probs, (by_hand_probs[0] + by_hand_probs[1]) / 2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, (by_hand_logits[0] + by_hand_logits[1]) / 2, rtol=1e-4, atol=1e-4)
    assert torch.allclose(probs.sum(1), torch.ones(5))
    with pytest.raises(ClassCountMismatchError, match="student.num_classes=10"):
        ensemble.check_student(num_classes=100, in_chans=1)
    with pytest.raises(ClassCountMismatchError, match="input channels"):
        ensemble.check_student(num_classes=10, in_chans=3)


def test_teachers_with_different_class_counts_are_refused(tmp_path):
    a = export_model(create_model("test_resnet", num_classes=10, in_chans=1), tmp_path / "a",
                     dict(input_size=(1, 28, 28), mean=(0.5,), std=(0.5,)))
    b = export_model(create_model("test_resnet", num_classes=7, in_chans=1), tmp_path / "b",
                     dict(input_size=(1, 28, 28), mean=(0.5,), std=(0.5,)))
    with pytest.raises(ClassCountMismatchError, match="disagree on the number of classes"):
        TeacherEnsemble.from_specs([TeacherSpec("test_resnet", str(a)), TeacherSpec("test_resnet", str(b))])


# ----------------------------------------------------------------------------- data


def test_fashion_mnist_sizes_and_class_balance():
    train, test = FashionMNIST(train=True), FashionMNIST(train=False)
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    assert torch.bincount(test.targets).tolist() == [1000] * 10
    idx = stratified_indices(test.targets, 95, 10)
    assert len(idx) == 95 and sorted(torch.bincount(test.targets[idx]).tolist()) == [9] * 5 + [10] * 5


def test_recorded_crop_rerenders_identically():
    torch.manual_seed(3)
    base = FashionMNIST(train=False)
    view = TrainView(base, RandomCropSampler(scale=(0.2, 1.0)), 32)
    flips = set()
    for i in range(20):
        crop, label, index, params = view[i]
        p = CropParams.from_tensor(params)
        flips.add(p.flip)
        assert crop.shape == (1, 32, 32) and crop.dtype == torch.uint8 and index == i
        assert torch.equal(render_crop(base.images[i], p, 32), crop)
        assert p.height * p.width <= 28 * 28
    assert flips == {True, False}  # both branches exercised


@pytest.mark.parametrize("channels,interpolation,size", [(1, "bilinear", 32), (3, "bilinear", (24, 40)),
                                                          (3, "bicubic", 32), (1, "bicubic", 28)])
def test_crops_rendered_together_are_the_pixels_of_each_rendered_alone(channels, interpolation, size):
    """render_crops / render_samples group crops by box size (one resize per size): the same bytes as render_crop /
    render_sample one by one, for boxes of shared and distinct sizes, the output's own size, flips, a box reaching
    outside its image (padded) and CutMix partners."""
    g = torch.Generator().manual_seed(channels)
    images = [torch.randint(0, 256, (channels, 28 + i % 3, 30), dtype=torch.uint8, generator=g) for i in range(40)]
    boxes = [(i % 4, i % 5, 20 + i % 3, 18 + i % 4, i % 2) for i in range(30)]  # few sizes: shared resizes
    boxes += [(0, 0, 28, 28, 1), (0, 1, 28, 28, 0), (3, 2, 7, 11, 1), (-2, 5, 20, 20, 0), (10, 10, 25, 25, 1)]
    boxes += [(1, 1, 24 + i, 17 + i, 0) for i in range(5)]
    crops = torch.tensor(boxes)
    def one(i: int, crop) -> torch.Tensor:
        return render_crop(images[i], CropParams.from_tensor(crop), size, interpolation)

    alone = torch.stack([one(i, c) for i, c in enumerate(crops)])
    assert torch.equal(render_crops(images, crops, size, interpolation), alone)
    mix_ids = torch.tensor([(i * 7) % 40 if i % 3 else -1 for i in range(40)])
    mix_crops, mix_boxes = crops.flip(0), torch.tensor([(i % 6, i % 5, 3 + i % 9, 4 + i % 7) for i in range(40)])
    samples = [one(i, crops[i]) if mix_ids[i] < 0 else render_sample(
        images[i], CropParams.from_tensor(crops[i]), size, interpolation,
        MixParams(int(mix_ids[i]), CropParams.from_tensor(mix_crops[i]), tuple(mix_boxes[i].tolist())),
        images[int(mix_ids[i])]) for i in range(40)]
    together = render_samples(images, crops, size, interpolation, mix_ids, mix_crops, mix_boxes, images.__getitem__)
    assert torch.equal(together, torch.stack(samples))
    assert not torch.equal(together, alone)  # the partners were pasted


def test_missing_and_truncated_dataset_files_get_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(root=str(tmp_path))
    src = FashionMNIST(train=False).root
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(src / name, tmp_path / name)
    data = gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(data[: len(data) // 2])  # truncated payload, valid gzip
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        FashionMNIST(root=str(tmp_path), train=False)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08garbage")  # broken gzip
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        FashionMNIST(root=str(tmp_path), train=False)
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(b"\x00\x00\x0d\x01" + bytes(8))
    with pytest.raises(DatasetError, match="missing"):
        FashionMNIST(root=str(tmp_path), train=True)


# ----------------------------------------------------------------------------- models and config errors


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ModelNotFoundError, match=r"unknown timm model 'resnet51'.*Did you mean:.*resnet50"):
        create_model("resnet51", num_classes=10)
    with pytest.raises(ModelNotFoundError, match="not found"):
        create_model("resnet18", num_classes=10, weights="/nonexistent/weights.safetensors")


def test_export_roundtrip_is_timm_loadable(tmp_path):
    import timm

    dc = dict(input_size=(1, 28, 28), mean=(0.286,), std=(0.353,), interpolation="bilinear", crop_pct=1.0)
    model = create_model("test_efficientnet", num_classes=10, in_chans=1, data_config=dc).eval()
    out = export_model(model, tmp_path / "student", dc, label_names=[str(i) for i in range(10)])
    x = torch.randn(3, 1, 28, 28)
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    overlay = timm.create_model("test_efficientnet", pretrained=True, num_classes=10, in_chans=1,
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=10)).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))
        torch.testing.assert_close(overlay(x), model(x))
    assert tuple(plain.pretrained_cfg["mean"]) == (0.286,) and tuple(plain.pretrained_cfg["input_size"]) == (1, 28, 28)
    with pytest.raises(ClassCountMismatchError, match="num_classes=10"):
        create_model("test_efficientnet", num_classes=100, in_chans=1, weights=str(out))
    # a channels-last student (run.channels_last, the engine's default; 3x3 convs are then not dense rows)
    # exports to a plain timm model with the same outputs, and stays channels-last itself
    resnet = create_model("test_resnet", num_classes=10, in_chans=1, data_config=dc).eval()
    resnet = resnet.to(memory_format=torch.channels_last)
    cl = export_model(resnet, tmp_path / "cl", dc)
    with torch.no_grad():
        torch.testing.assert_close(timm.create_model(f"local-dir:{cl}", pretrained=True).eval()(x), resnet(x))
    assert not all(p.is_contiguous() for p in resnet.parameters())


BASE = {"data": {"dataset": "fashion-mnist"}, "teachers": {"models": ["a"]}}


def test_bad_config_values_and_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.epoch'.*Did you mean: epochs"):
        load_config(data={"optim": {"epoch": 3}})
    with pytest.raises(ConfigError, match="optim.lr=-0.1 must be a positive number"):
        load_config(data=dict(BASE, optim={"lr": -0.1}))
    with pytest.raises(ConfigError, match="optim.epochs='ten' must be a number"):
        load_config(data=dict(BASE, optim={"epochs": "ten"}))
    with pytest.raises(ConfigError, match="loss.discriminator='gan'"):
        load_config(data=dict(BASE, loss={"discriminator": "gan"}))
    with pytest.raises(ConfigError, match="divisible by run.num_workers=3"):
        load_config(data=dict(BASE, optim={"batch_size": 64}, run={"num_workers": 3}))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("jobs/no-such-job.yaml")
    with pytest.raises(ConfigError, match="teachers.request='boxes': use pixels"):
        load_config(data=dict(BASE, teachers={"models": ["a"], "request": "boxes"}))
    with pytest.raises(ConfigError, match="teachers.client='proxy': use ingress"):
        load_config(data=dict(BASE, teachers={"models": ["a"], "client": "proxy"}))
    with pytest.raises(ConfigError, match="teachers.request=crops is for teachers.source=served"):
        load_config(data=dict(BASE, teachers={"source": "local", "models": ["resnet18"], "request": "crops"}))
    cfg = load_config(data=BASE, overrides=["optim.epochs=3", "data.crop_scale=[0.5,1]", "optim.weight_decay=5e-5"])
    assert cfg.optim.epochs == 3 and cfg.data.crop_scale == (0.5, 1)
    assert cfg.optim.weight_decay == 5e-5  # YAML 1.1 reads 5e-5 as a string; numbers in that form are accepted
    # a number in the key is a list index: one field of one teacher changes, the rest of the list stays
    cfg = load_config("jobs/imagenet-resnet50-224.yaml", overrides=["teachers.models.1.pretrained=false"])
    assert [(t.model, t.pretrained) for t in cfg.teachers.models] == [("senet154.gluon_in1k", True),
                                                                      ("resnet152s.gluon_in1k", False)]
    with pytest.raises(ConfigError, match=r"teachers.models.2: teachers.models has 2 item\(s\), numbered from 0"):
        load_config("jobs/imagenet-resnet50-224.yaml", overrides=["teachers.models.2.pretrained=false"])
    # the paper's defaults
    cfg = load_config(data=BASE)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.d_lr) == (0.01, 0.9, 0.0, 1e-4)
    assert cfg.optim.lr_milestones == (100,) and cfg.loss.hard_label_weight == 0.0


# ----------------------------------------------------------------------------- a short distillation


def test_short_distillation_moves_a_weak_student_toward_the_teachers(trained_teachers):
    from meal_ray.engine import Engine
    from meal_ray.evaluation import evaluate
    from meal_ray.sources.local import LocalSoftLabels

    specs = [{"model": t["model"], "weights": t["weights"]} for t in trained_teachers]
    cfg = _cfg("distill", "test_efficientnet", epochs=3, lr=0.05, subset=6000, teachers=specs)
    ensemble = TeacherEnsemble.from_specs(cfg.teachers.models)
    engine = Engine.for_job(cfg, source=LocalSoftLabels(ensemble), log=lambda s: None)
    ensemble_top1 = evaluate(lambda x: ensemble(x)[0], engine.val_loader, 10).top1
    assert ensemble_top1 > 70, trained_teachers

    def val_soft_ce():
        engine.student.eval()
        with torch.no_grad():
            total = n = 0
            for images, _ in engine.val_loader:
                total += soft_cross_entropy(engine.student(engine.normalize(images)),
                                            ensemble(images)[0]).item() * len(images)
                n += len(images)
        return total / n

    before_ce, before_top1 = val_soft_ce(), engine.evaluate().top1
    history = []
    result = engine.fit(lambda epoch, m, r: history.append(m))
    after_ce = val_soft_ce()
    assert after_ce < 0.7 * before_ce, (before_ce, after_ce)
    assert history[-1]["soft_ce"] < history[0]["soft_ce"]
    assert (result.top1 > before_top1 + 30
            and result.top1 > 0.75 * ensemble_top1), (before_top1, result.top1, ensemble_top1)
    assert "disc_loss" in history[0] and 0 <= history[0]["teacher_wait_frac"] <= 1


def test_every_shipped_job_config_is_valid():
    import glob

    import timm

    paths = sorted(glob.glob("jobs/*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        cfg = load_config(path)
        assert timm.is_model(cfg.student.model), path
        assert all(timm.is_model(t.model) for t in cfg.teachers.models), path
        if cfg.data.dataset == "imagefolder":  # the paper's settings
            assert ((cfg.optim.epochs, cfg.optim.batch_size, cfg.optim.lr, cfg.optim.d_lr)
                    == (180, 512, 0.01, 1e-4)), path


def test_demo_summary_is_mean_and_sample_std_over_seeds():
    from meal_ray.demo import format_summary, gain_over_control, summarize

    def run(seed, control, meal):
        rows = [dict(model=m, arch="a", params=10, top1=t, top5=99.0, gap_to_ensemble=t - 90.0,
                     similar_classes=t - 5, dissimilar_classes=t + 5, nll=(100 - t) / 40, ece=(100 - t) / 4)
                for m, t in (("teacher ensemble", 90.0), ("control (hard labels)", control),
                             ("MEAL V2 (ensemble soft labels)", meal))]
        return {"seed": seed, "rows": rows}

    runs = [run(0, 85.0, 86.0), run(1, 85.5, 86.5), run(2, 86.0, 87.5)]
    summary = summarize(runs)
    meal = summary[-1]
    assert meal["n"] == 3 and meal["top1"]["mean"] == pytest.approx(86.6666667)
    assert meal["top1"]["std"] == pytest.approx(0.7637626, rel=1e-6)  # sample std of 86, 86.5, 87.5
    assert meal["top1"]["per_seed"] == [86.0, 86.5, 87.5] and meal["top1"]["min"] == 86.0
    assert summary[0]["top1"]["std"] == 0.0  # the shared ensemble row does not vary
    gain = gain_over_control(summary)
    assert gain["per_seed"] == pytest.approx([1.0, 1.0, 1.5])
    assert gain["mean"] == pytest.approx(7 / 6) and gain["std"] == pytest.approx(0.288675, rel=1e-5)
    assert gain["seed_spread"] == pytest.approx(0.7637626, rel=1e-6) and gain["beats_seed_spread"]
    text = format_summary(summary, gain, [0, 1, 2])
    assert "| MEAL V2 (ensemble soft labels) | a | 0.00M | 86.67 ± 0.76 |" in text
    assert text.splitlines()[2].endswith("| NLL | ECE % |") and "| 0.333 ± 0.019 | 3.33 ± 0.19 |" in text
    assert "MEAL V2 - control (top-1): +1.17 ± 0.29 points (per seed: +1.00, +1.00, +1.50)" in text
    assert "MEAL V2 beats the control by more than the seed spread (larger arm top-1 std: 0.76 points)" in text
    close = summarize([run(0, 85.0, 85.3), run(1, 85.5, 85.9), run(2, 86.0, 86.2)])
    assert not gain_over_control(close)["beats_seed_spread"]  # mean gain 0.3 < control std 0.5


def test_demo_ablations_reuse_the_control_they_do_not_change():
    from meal_ray.demo import _arm_tags

    assert _arm_tags(False, 0.0, 0.0, "pretrained") == ("", "")
    assert _arm_tags(True, 0.0, 0.5, "pretrained") == ("", "-no-disc-hard0.5")  # same control as the default run
    assert _arm_tags(False, 1e-4, 0.0, "random") == ("-wd0.0001-random-init", "-wd0.0001-random-init")
    # CutMix other than the preset's changes both arms
    assert _arm_tags(False, 0.0, 0.0, "pretrained", cutmix=False) == ("-no-cutmix", "-no-cutmix")
    assert _arm_tags(False, 0.0, 0.0, "pretrained", authors_d_lr=True) == ("", "-authors-dlr")  # the default control


def test_demo_refuses_bad_ablation_values_before_training(tmp_path):
    from meal_ray.demo import run_demo

    for kwargs, text in ((dict(weight_decay=-1e-4), "optim.weight_decay"),
                         (dict(hard_label_weight=-0.5), "hard_label_weight=-0.5")):
        with pytest.raises(ConfigError, match="--weight-decay, --hard-label-weight") as err:
            run_demo(str(tmp_path / "demo"), **kwargs)
        assert text in str(err.value)
    assert not (tmp_path / "demo").exists()  # nothing started, nothing written


def test_gpu_options_do_nothing_harmful_on_cpu():
    """run.amp, data.pin_memory and loader workers are GPU settings: on CPU the student trains in fp32 and the
    weights are bit-identical to a run without them."""
    from meal_ray.engine import Engine

    weights = []
    for gpu_options in (False, True):
        cfg = _cfg("pretrain", "test_efficientnet", epochs=1, lr=0.05, subset=256)
        if gpu_options:
            cfg.run.amp, cfg.data.pin_memory = "fp16", True
        engine = Engine.for_job(cfg, log=lambda s: None)
        assert engine.amp is None and engine.scaler is None
        engine.train_epoch()
        weights.append(engine.student_raw.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    with pytest.raises(ConfigError, match="run.amp='fp8': use bf16, fp16"):
        load_config(data=dict(BASE, run={"amp": "fp8"}))


def test_bad_files_are_refused_by_name_before_ray_starts(tmp_path):
    """A binary or non-mapping config, a corrupt export, a cut .pth and a class count the dataset does not have:
    clear one-line errors from the CLI, no traceback, no Ray."""
    from click.testing import CliRunner

    from meal_ray.cli import main
    from meal_ray.models import create_model, export_model

    (tmp_path / "bin.yaml").write_bytes(b"\x00\x01\xff\xfe binary")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    export = export_model(create_model("test_resnet", num_classes=10, in_chans=1), tmp_path / "export",
                          FMNIST_DATA_CONFIG)
    blob = (export / "model.safetensors").read_bytes()
    (export / "model.safetensors").write_bytes(blob[:len(blob) // 2])
    torch.save(create_model("test_resnet", num_classes=10, in_chans=1).state_dict(), tmp_path / "good.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:5000])
    runner = CliRunner()
    cases = [
        (["distill", "--config", str(tmp_path / "bin.yaml")], "is not a text file (not UTF-8)"),
        (["distill", "--config", str(tmp_path / "list.yaml")], "must hold a YAML mapping"),
        (["evaluate", "--model", str(export)], "cannot be read"),
        (["pretrain", "--config", "jobs/fmnist-student-init.yaml", "--set", f"student.weights={tmp_path / 'cut.pth'}",
          "--set", "student.model=test_resnet"], "truncated or corrupt"),
        (["distill", "--config", "jobs/fashion-mnist-quick.yaml", "--set", "student.num_classes=7"],
         "the dataset has 10 classes but student.num_classes=7"),
    ]
    for args, message in cases:
        res = runner.invoke(main, args)
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, (args, res.output)


def test_mlflow_params_carry_no_credentials(tmp_path, monkeypatch):
    """A tracking URI with user:password@ is logged with ***@; nothing from the environment becomes a param."""
    from mlflow.tracking import MlflowClient

    from meal_ray.config import load_config
    from meal_ray.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "env-s3cret")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("jobs/fashion-mnist-quick.yaml").to_dict()
    cfg["run"]["tracking_uri"] = "https://alice:s3cret@mlflow.example.com/"
    tracker = Tracker(uri, log=lambda s: None)
    run_id = tracker.start("credentials", "job", cfg)
    params = MlflowClient(uri).get_run(run_id).data.params
    assert params["run.tracking_uri"] == "https://***@mlflow.example.com/"
    assert params["teachers.models.0.model"] == cfg["teachers"]["models"][0]["model"]  # the rest as given
    assert not any("s3cret" in v for v in params.values())


def test_stop_after_steps_rehearses_a_config_without_changing_its_schedule():
    """run.stop_after_steps ends training after that many steps: the weights equal those of the same steps taken by
    hand at the schedule's own learning rate (the epochs and milestones stay the config's), and the run is evaluated
    once, as a finished one is."""
    from meal_ray.engine import Engine, student_lr

    cfg = _cfg("pretrain", "test_efficientnet", epochs=180, lr=0.05, subset=512)
    cfg.run.stop_after_steps = 3
    rehearsal = Engine.for_job(cfg, log=lambda s: None)
    evaluated = []
    rehearsal.fit(lambda epoch, m, r: evaluated.append((epoch, m["lr"])))
    assert evaluated == [(1, student_lr(cfg.optim, 0))] and rehearsal.stopped_early

    by_hand = Engine.for_job(_cfg("pretrain", "test_efficientnet", epochs=180, lr=0.05, subset=512), log=lambda s: None)
    by_hand.train_loader.sampler.set_epoch(0)
    by_hand.student.train()
    for step, batch in enumerate(by_hand.batches()):
        by_hand.train_step(batch)
        if step == 2:
            break
    got, want = rehearsal.student_raw.state_dict(), by_hand.student_raw.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    for bad in (0, -3, 2.5):
        with pytest.raises(ConfigError, match="run.stop_after_steps=.* must be a .*whole number"):
            load_config(data=dict(BASE, run={"stop_after_steps": bad}))


def test_random_weight_teachers_are_the_same_network_wherever_they_are_built():
    """A rehearsal's teachers (pretrained: false, no weights) come from one fixed seed: two builds (two replicas, or a
    replica and the in-process ensemble) answer identically, whatever the caller's random state."""
    from meal_ray.ensemble import load_teacher

    crops = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(1)
    first = load_teacher(TeacherSpec(model="test_resnet"))(crops)[1]
    torch.manual_seed(2)
    state = torch.get_rng_state()
    second = load_teacher(TeacherSpec(model="test_resnet"))(crops)[1]
    assert torch.equal(first, second) and torch.equal(torch.get_rng_state(), state)  # the caller's stream untouched


def test_calibration_is_nll_and_15_bin_ece_computed_by_hand(tmp_path):
    """evaluate's NLL is the mean cross-entropy of the true class, its ECE the bin-share-weighted |accuracy -
    confidence| over 15 equal-width confidence bins, from logits and from probabilities alike."""
    from meal_ray.evaluation import evaluate
    from meal_ray.plots import plot_reliability

    # 4 samples, 3 classes; top-class probabilities 0.9, 0.9, 0.5, 0.34 (bins 13, 13, 7, 5); correct: yes, no, yes, no
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.34, 0.33, 0.33]])
    labels = torch.tensor([0, 1, 0, 2])
    batches = [(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), labels[:2]), (torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
                                                                           labels[2:])]
    rows = iter([probs[:2], probs[2:], probs[:2], probs[2:]])
    from_probs = evaluate(lambda x: next(rows), batches, 3, outputs="probs")
    from_logits = evaluate(lambda x: next(rows).log() + 7.0, batches, 3)  # softmax(log p + c) = p
    nll = -(math.log(0.9) + math.log(0.05) + math.log(0.5) + math.log(0.33)) / 4
    # bin 13: acc 1/2, conf 0.9; bin 7: acc 1, conf 0.5; bin 5: acc 0, conf 0.34
    ece = (2 / 4) * abs(0.5 - 0.9) + (1 / 4) * abs(1 - 0.5) + (1 / 4) * abs(0 - 0.34)
    for result in (from_probs, from_logits):
        assert result.nll == pytest.approx(nll, rel=1e-5) and result.ece == pytest.approx(ece, rel=1e-5)
        assert result.reliability["count"][13] == 2 and result.reliability["count"][7] == 1
        assert result.reliability["accuracy"][13] == pytest.approx(0.5) and sum(result.reliability["count"]) == 4
    assert from_probs.top1 == 50.0
    path = plot_reliability({"x": {"reliability": from_probs.reliability, "ece": from_probs.ece}}, tmp_path / "r.png")
    assert path.stat().st_size > 1000


def test_discriminator_lr_is_constant_by_default_and_follows_the_student_in_the_authors_way(trained_teachers):
    """optim.d_lr stays constant through the schedule (the paper); with d_lr_schedule: student the discriminator's
    group takes the student's lr at every step, as the authors' lr regime does (MEAL-V2 issue #9)."""
    from meal_ray.engine import Engine, student_lr
    from meal_ray.sources.local import LocalSoftLabels

    specs = [{"model": t["model"], "weights": t["weights"]} for t in trained_teachers]
    seen = {}
    for schedule in ("constant", "student"):
        cfg = _cfg("distill", "test_efficientnet", epochs=2, lr=0.05, subset=256, teachers=specs,
                   optim=dict(lr_schedule="cosine", d_lr_schedule=schedule))
        engine = Engine.for_job(cfg, source=LocalSoftLabels(TeacherEnsemble.from_specs(cfg.teachers.models)),
                                log=lambda s: None)
        lrs = []
        step = engine.train_step
        engine.train_step = lambda batch: (lrs.append({g["name"]: g["lr"] for g in engine.optimizer.param_groups}),
                                           step(batch))[1]
        engine.fit()
        seen[schedule] = lrs
    steps = len(seen["constant"]) // 2
    assert all(lr["discriminator"] == 1e-4 for lr in seen["constant"])
    assert [lr["discriminator"] for lr in seen["student"]] == [lr["student"] for lr in seen["student"]]
    assert seen["student"][steps + 1]["discriminator"] == pytest.approx(student_lr(cfg.optim, 1, 1 / steps))
    assert seen["student"][0]["student"] == seen["constant"][0]["student"] == 0.05
    with pytest.raises(ConfigError, match="optim.d_lr_schedule='cosine': use constant"):
        load_config(data=dict(BASE, optim={"d_lr_schedule": "cosine"}))


def test_config_differences_name_the_keys_and_skip_the_ignored_ones():
    """One comparison serves `--resume` (only optim.epochs may grow) and the demo's stage reuse (tracking ignored)."""
    from meal_ray.config import config_differences

    a = load_config("jobs/fashion-mnist.yaml").to_dict()
    b = load_config("jobs/fashion-mnist.yaml", overrides=["optim.epochs=99", "optim.lr=0.5", "run.tracking_uri=x",
                                                          "data.crop_scale=[0.5, 1.0]"]).to_dict()
    assert config_differences(a, b) == ["data.crop_scale", "optim.epochs", "optim.lr", "run.tracking_uri"]
    assert config_differences(a, b, ignore=["optim.epochs", "run.tracking_uri"]) == ["data.crop_scale", "optim.lr"]
    assert config_differences(a, load_config("jobs/fashion-mnist.yaml").to_dict()) == []


def test_student_lr_schedules_match_the_paper_and_cosine():
    """Step (the paper): 0.01 for epochs [0, 100), 0.001 from 100 on, whatever the step within an epoch; cosine: lr at
    the start, half of it midway, 0 at the end, per step."""
    from meal_ray.config import OptimConfig
    from meal_ray.engine import student_lr

    step = OptimConfig()  # the paper's defaults
    assert [student_lr(step, e, f) for e, f in ((0, 0.0), (99, 0.99), (100, 0.0), (179, 0.5))] == pytest.approx(
        [0.01, 0.01, 0.001, 0.001])
    two = OptimConfig(lr=0.1, lr_milestones=(2, 4), lr_gamma=0.5)
    assert [student_lr(two, e) for e in range(6)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    cosine = OptimConfig(lr=0.05, lr_schedule="cosine", epochs=10)
    assert student_lr(cosine, 0) == pytest.approx(0.05) and student_lr(cosine, 5) == pytest.approx(0.025)
    assert student_lr(cosine, 2, 0.5) == pytest.approx(0.025 * (1 + math.cos(math.pi * 0.25)))
    assert student_lr(cosine, 10) == pytest.approx(0.0, abs=1e-12)


class _WindowedTeachers:
    """In-process teachers behind the served source's prefetch window (the window is what is under test): records,
    for each request, the epoch of its batch and the epoch the engine was training when it went out."""

    name = "windowed"

    def __init__(self, ensemble, engine_epoch, window: int = 2):
        from meal_ray.sources.base import PrefetchWindow

        self.ensemble, self.engine_epoch, self.requests = ensemble, engine_epoch, []
        self.window = PrefetchWindow(self._submit, lambda reply: reply, window)

    def _submit(self, batch):
        self.requests.append((batch.epoch, self.engine_epoch()))
        probs, logits = self.ensemble(batch.images)
        return probs.clone(), logits.clone(), 0.0, 0

    def attach(self, batches):
        return self.window.attach(batches)

    def crop_sampler(self):
        return None

    def close(self):
        pass


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_the_window_asks_for_the_next_epoch_while_this_one_trains_and_a_resume_draws_the_same_batches(tiny_teachers,
                                                                                                     loader_workers):
    """No refill at an epoch start: the prefetch window requests epoch e+1's first batches while epoch e's last steps
    train. The crops and mixes are drawn on a stream of their own, snapshotted where each epoch's drawing began, so a
    run resumed from the checkpoint a run saved after epoch 1 (student with dropout, CutMix on; crops drawn in this
    process or in DataLoader worker processes) ends bit-identical to that run, and asks for the same batches."""
    import io

    from meal_ray.engine import Engine
    from meal_ray.ensemble import TeacherSet

    cfg = _cfg("distill", "test_efficientnet", 3, 0.05, 256, teachers=tiny_teachers,
               student={"drop_rate": 0.3}, optim={"cutmix": True})
    cfg.data.loader_workers = loader_workers
    ensemble = TeacherSet.from_config(cfg.teachers).load()

    def engine():
        e = Engine.for_job(cfg, log=lambda s: None)
        e.source = _WindowedTeachers(ensemble, lambda: e.epoch)
        return e

    checkpoint = io.BytesIO()
    whole = engine()
    whole.fit(lambda epoch, m, r: torch.save(whole.state_dict(), checkpoint) if epoch == 1 else None)
    steps = len(whole.train_loader)
    assert (1, 0) in whole.source.requests and (2, 1) in whole.source.requests  # asked a step ahead
    assert [e for e, _ in whole.source.requests] == [e for e in range(3) for _ in range(steps)]

    checkpoint.seek(0)
    resumed = engine()
    torch.manual_seed(999)  # whatever the process's stream, the checkpoint's are put back
    resumed.load_state_dict(torch.load(checkpoint, weights_only=True))
    resumed.fit()
    for name in ("student_raw", "discriminator_raw"):
        want, got = getattr(whole, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert [e for e, _ in resumed.source.requests] == [1] * steps + [2] * steps


def test_the_engine_applies_the_discriminator_mode_the_config_names():
    """loss.discriminator through the engine, one step from one init on one batch: the discriminator learns the
    same in reference and adversarial mode (its own loss does not depend on the student's gradient), and the
    student's two updates straddle the update without a discriminator (off): its loss's gradient reaches the student
    with opposite signs."""
    from dataclasses import replace

    from meal_ray.engine import Engine

    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 3
    steps = {}
    for mode in ("reference", "adversarial", "off"):
        cfg = _cfg("distill", "test_efficientnet", 1, 0.05, 256, teachers=[{"model": "test_resnet"}],
                   loss={"discriminator": mode})
        engine = Engine.for_job(cfg, log=lambda s: None)
        engine.student.train()
        batch = next(engine.batches())
        before = {k: v.clone() for k, v in engine.student_raw.state_dict().items()}
        engine.train_step(replace(batch, teacher_probs=logits.softmax(1), teacher_logits=logits))
        after = engine.student_raw.state_dict()
        steps[mode] = ({k: after[k] - before[k] for k in before if before[k].is_floating_point()},
                       engine.discriminator_raw and engine.discriminator_raw.state_dict())
    (ref, ref_d), (adv, adv_d), (off, off_d) = steps["reference"], steps["adversarial"], steps["off"]
    assert off_d is None and all(torch.equal(ref_d[k], adv_d[k]) for k in ref_d)
    moved = [k for k in ref if not torch.equal(ref[k], adv[k])]
    assert moved  # the discriminator's gradient reached the student
    for k in ref:
        torch.testing.assert_close((ref[k] + adv[k]) / 2, off[k], rtol=1e-4, atol=1e-6)
