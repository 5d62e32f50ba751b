"""Bad input, swept as a new user would give it: every kind gets a clear error naming the problem and the fix, no
traceback, and nothing already written changes (checksums of a finished run directory before and after).

Everything here is refused on the driver before Ray starts (the sweep takes seconds). What can only fail remotely is
tested where it happens: malformed requests to the Serve application in test_serving.py, a pickled checkpoint payload
and unreadable checkpoints in test_faults.py.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import FMNIST_DATA_CONFIG

from meal_ray.cli import main

ROOT = Path(__file__).resolve().parent.parent
QUICK = str(ROOT / "jobs" / "fashion-mnist-quick.yaml")
INIT = str(ROOT / "jobs" / "fmnist-student-init.yaml")
SERVE = str(ROOT / "deployments" / "fashion-mnist.yaml")


class Payload:
    """Stands for any pickled object in a weights file (unpickled without weights_only, it could run code)."""


def checksums(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A finished run directory (as a run leaves it: record, config, metrics, export, checkpoint) and bad files."""
    from meal_ray.config import load_config
    from meal_ray.models import create_model, export_model
    from meal_ray.train.worker import save_state

    root = tmp_path_factory.mktemp("bad-input")
    run = root / "finished"
    cfg = load_config(INIT, [f"run.output={run}"])
    student = create_model(cfg.student.model, num_classes=10, in_chans=1)
    export_model(student, run / "student", FMNIST_DATA_CONFIG)
    (run / "ray" / "train" / "checkpoint_000000").mkdir(parents=True)
    save_state({"epoch": 1, "student": student.state_dict()}, run / "ray" / "train" / "checkpoint_000000")
    (run / "run.json").write_text(json.dumps({"name": cfg.name, "mode": cfg.mode, "student": cfg.student.model,
                                              "config": cfg.to_dict()}))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (run / "metrics.json").write_text(json.dumps({"top1": 50.0}))

    teacher = create_model("test_resnet", num_classes=10, in_chans=1)
    good = export_model(teacher, root / "teacher", FMNIST_DATA_CONFIG)
    cut = shutil.copytree(good, root / "cut-export")
    blob = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    no_config = shutil.copytree(good, root / "no-config-export")
    (no_config / "config.json").unlink()
    torch.save(teacher.state_dict(), root / "teacher.pth")
    (root / "cut.pth").write_bytes((root / "teacher.pth").read_bytes()[:5000])
    (root / "not-weights.safetensors").write_text("hello")
    (root / "empty-demo").mkdir()
    (root / "cut-demo" / "ablation-no-disc-cache-only").mkdir(parents=True)
    (root / "cut-demo" / "ablation-no-disc-cache-only" / "results.json").write_text('{"seeds": [0], "summ')
    torch.save({"state_dict": teacher.state_dict(), "payload": Payload()}, root / "pickled.pth")

    (root / "bin.yaml").write_bytes(b"\x00\x01\xff\xfe binary")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "broken.yaml").write_text("optim: [1, 2\nname: x\n")
    (root / "a-file").write_text("not a directory")

    for name in ("empty", "flat"):
        (root / name / "train").mkdir(parents=True)
        (root / name / "val").mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(root / "flat" / "train" / "image.png")  # no class folders
    (root / "no-val" / "train" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(root / "no-val" / "train" / "cat" / "0.png")

    from meal_ray.data.datasets import FashionMNIST

    fm = root / "fmnist-cut"
    fm.mkdir()
    for f in FashionMNIST(train=False).root.glob("*-ubyte.gz"):
        shutil.copy(f, fm / f.name)
    data = gzip.open(fm / "train-images-idx3-ubyte.gz").read()
    with gzip.open(fm / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(data[: len(data) // 3])

    serve = yaml.safe_load(Path(SERVE).read_text())
    serve["applications"][0]["args"]["teacher"] = serve["applications"][0]["args"].pop("teachers")
    (root / "serve-typo.yaml").write_text(yaml.safe_dump(serve))
    (root / "serve-not-schema.yaml").write_text("applications: {name: x}\n")
    serve = yaml.safe_load(Path(SERVE).read_text())
    serve["applications"][0]["deployments"][0]["ray_actor_options"]["label_selector"] = {"meal-ray.io/pool": "-x"}
    (root / "serve-bad-selector.yaml").write_text(yaml.safe_dump(serve))
    return root


def cases(f: Path) -> list:
    """(what, CLI args, the words the error must hold)."""
    run, teacher = f / "finished", str(f / "teacher")
    local = ["--set", "teachers.source=local"]
    return [
        # job configs
        ("config missing", ["distill", "--config", "no-such.yaml"], "does not exist"),
        ("config is binary", ["distill", "--config", str(f / "bin.yaml")], "is not a text file"),
        ("config is a YAML list", ["distill", "--config", str(f / "list.yaml")], "must hold a YAML mapping"),
        ("config YAML syntax", ["distill", "--config", str(f / "broken.yaml")], "is not valid YAML"),
        ("unknown key", ["distill", "--config", QUICK, "--set", "optim.epoch=3"], "Did you mean: epochs"),
        ("bad value", ["distill", "--config", QUICK, "--set", "optim.lr=-0.1"], "must be a positive number"),
        ("not a number", ["distill", "--config", QUICK, "--set", "optim.epochs=ten"], "must be a number"),
        ("--set without =", ["distill", "--config", QUICK, "--set", "optim.epochs"], "section.key=value"),
        ("top-k replies off the served path", ["distill", "--config", QUICK, *local, "--set",
                                               "teachers.reply_top_k=3"], "is for teachers.source=served"),
        ("top-k replies above the classes", ["distill", "--config", QUICK, "--set", "teachers.reply_top_k=11"],
         "more than the 10 classes"),
        ("wrong mode", ["pretrain", "--config", QUICK], "use `meal-ray distill`"),
        ("batch vs workers", ["distill", "--config", QUICK, "--set", "run.num_workers=3"], "divisible by"),
        # placement (Ray Train's ScalingConfig names)
        ("worker label selector syntax", ["distill", "--config", QUICK, "--set",
                                          "run.label_selector={meal-ray.io/pool: -students}"],
         "run.label_selector"),
        ("worker resource name case", ["distill", "--config", QUICK, "--set", "run.resources_per_worker={gpu: 1}"],
         "write GPU"),
        ("accelerator type without GPUs", ["distill", "--config", QUICK, "--set", "run.accelerator_type=A100"],
         "set run.use_gpu: true"),
        # models and weights
        ("student name typo", ["distill", "--config", QUICK, "--set", "student.model=mobilenetv3_smal_050"],
         "unknown timm model"),
        ("teacher name typo", ["distill", "--config", QUICK, *local, "--set",
                               'teachers.models=[{"model": "resnet1B", "weights": "' + teacher + '"}]'],
         "unknown timm model"),
        ("class count vs dataset", ["distill", "--config", QUICK, "--set", "student.num_classes=7"],
         "the dataset has 10 classes"),
        ("student weights missing", ["pretrain", "--config", INIT, "--set", "student.weights=/nope.pth"], "not found"),
        ("student weights cut", ["pretrain", "--config", INIT, "--set", "student.model=test_resnet", "--set",
                                 f"student.weights={f / 'cut.pth'}"], "truncated or corrupt"),
        ("student weights not weights", ["pretrain", "--config", INIT, "--set",
                                         f"student.weights={f / 'not-weights.safetensors'}"], "cannot be read"),
        ("student weights other arch", ["pretrain", "--config", INIT, "--set", "student.model=test_efficientnet",
                                        "--set", f"student.weights={teacher}"], "test_resnet"),
        ("student .pth other arch", ["pretrain", "--config", INIT, "--set", "student.model=test_efficientnet",
                                     "--set", f"student.weights={f / 'teacher.pth'}"], "does not fit model"),
        ("student .pth with a pickled object", ["pretrain", "--config", INIT, "--set", "student.model=test_resnet",
                                               "--set", f"student.weights={f / 'pickled.pth'}"],
         "Weights only load failed"),
        ("teacher weights missing", ["distill", "--config", QUICK, *local, "--set",
                                     'teachers.models=[{"model": "test_resnet", "weights": "/nope"}]'], "not found"),
        ("teacher weights cut", ["distill", "--config", QUICK, *local, "--set",
                                 'teachers.models=[{"model": "test_resnet", "weights": "' + str(f / "cut-export")
                                 + '"}]'], "cannot be read"),
        ("teacher weights other arch", ["distill", "--config", QUICK, *local, "--set",
                                        'teachers.models=[{"model": "resnet10t", "weights": "' + teacher + '"}]'],
         "test_resnet"),
        # datasets
        ("dataset name", ["distill", "--config", QUICK, "--set", "data.dataset=fashion_mnist"], "fashion-mnist"),
        ("dataset truncated", ["pretrain", "--config", INIT, "--set", f"data.root={f / 'fmnist-cut'}"],
         "truncated or corrupt"),
        ("dataset root missing", ["pretrain", "--config", INIT, "--set", "data.root=/nope"], "not found"),
        ("image folder missing", ["pretrain", "--config", INIT, "--set", "data.dataset=imagefolder", "--set",
                                  "data.root=/nope"], "/nope"),
        ("image folder empty", ["pretrain", "--config", INIT, "--set", "data.dataset=imagefolder", "--set",
                                f"data.root={f / 'empty'}"], "class"),
        ("image folder flat", ["pretrain", "--config", INIT, "--set", "data.dataset=imagefolder", "--set",
                               f"data.root={f / 'flat'}"], "class"),
        ("image folder without val", ["pretrain", "--config", INIT, "--set", "data.dataset=imagefolder", "--set",
                                      f"data.root={f / 'no-val'}"], "val"),
        ("mean vs std", ["pretrain", "--config", INIT, "--set", "data.mean=[0.5,0.5,0.5]", "--set",
                         "data.std=[0.5]"], "data.std has 1"),
        ("negative loader workers", ["pretrain", "--config", INIT, "--set", "data.loader_workers=-1"],
         "data.loader_workers=-1 must be >= 0"),
        # output directories (the finished run must come out unchanged)
        ("output holds a run", ["pretrain", "--config", INIT, "--output", str(run)], "--resume"),
        ("resume, other config", ["pretrain", "--config", INIT, "--output", str(run), "--resume", "--set",
                                  "optim.lr=0.5"], "different config"),
        ("resume, no run", ["pretrain", "--config", INIT, "--output", str(f / "nothing-here"), "--resume"],
         "holds no run"),
        ("overwrite with a bad config", ["pretrain", "--config", INIT, "--output", str(run), "--overwrite", "--set",
                                         "student.model=resnet51"], "unknown timm model"),
        ("output is a file", ["pretrain", "--config", INIT, "--output", str(f / "a-file")], "not a directory"),
        # exports
        ("evaluate, no export", ["evaluate", "--model", "/nope"], "is not a meal-ray model export"),
        ("evaluate, cut export", ["evaluate", "--model", str(f / "cut-export")], "cannot be read"),
        ("evaluate, export without config", ["evaluate", "--model", str(f / "no-config-export")], "config.json"),
        # Serve configs
        ("serve config missing", ["teachers", "up", "--config", "/nope.yaml"], "does not exist"),
        ("serve app arg typo", ["teachers", "up", "--config", str(f / "serve-typo.yaml")], "teachers"),
        ("serve config off schema", ["teachers", "up", "--config", str(f / "serve-not-schema.yaml")], "applications"),
        ("serve label selector syntax", ["teachers", "up", "--config", str(f / "serve-bad-selector.yaml")],
         "label"),
        ("plan headroom", ["plan", "--config", QUICK, "--serve-config", SERVE,
                           "--headroom", "0.5"], "headroom"),
        # the soft-label cache
        ("cache missing", ["distill", "--config", QUICK, "--set", "teachers.source=cache", "--set",
                           "teachers.cache=/nope"], "relabel"),
        ("relabel passes", ["relabel", "--config", QUICK, "--passes", "0", "--output", str(f / "cache")], "passes"),
        # the demo
        ("demo seeds", ["demo", "--seeds", "a,b"], "comma-separated list of integers"),
        ("demo top-k", ["demo", "--cache-top-k", "3"], "--cache-passes"),
        ("demo cache only", ["demo", "--no-served-arm"], "--cache-passes"),
        ("demo arm epochs", ["demo", "--arm-epochs", "0"], "--arm-epochs=0 must be >= 1"),
        ("ablations, no demo there", ["ablations", "--output", str(f / "empty-demo")], "run `meal-ray demo --output"),
        ("ablations, cut report", ["ablations", "--output", str(f / "cut-demo")], "run that demo command again"),
    ]


def test_every_bad_input_is_refused_by_name_and_changes_nothing(files, monkeypatch):
    monkeypatch.chdir(files)  # jobs' default outputs (runs/<name>) land here, not in the repository
    before = checksums(files / "finished")
    runner, failures = CliRunner(), []
    sweep = cases(files)
    for what, args, words in sweep:
        res = runner.invoke(main, args)
        text = res.output + (str(res.exception) if res.exception and not isinstance(res.exception, SystemExit)
                             else "")
        clear = res.exit_code not in (0, None) and words in res.output and "Traceback" not in text \
            and isinstance(res.exception, (SystemExit, type(None)))
        if not clear:
            failures.append(f"{what}: exit {res.exit_code}, {type(res.exception).__name__}: {text[-400:]!r}")
    assert not failures, "\n".join(failures)
    assert len(sweep) == 57  # every kind above ran (the README counts them)
    assert checksums(files / "finished") == before  # nothing already written changed
    assert not (files / "nothing-here").exists() and not (files / "cache").exists()


def test_weights_files_are_matched_to_their_architecture_before_loading(files):
    """The sweep's other side: a state dict of the right architecture passes (its classifier may have another class
    count: timm re-initializes it); so does an export with the right architecture."""
    from meal_ray.errors import ModelNotFoundError
    from meal_ray.models import check_weights_fit

    for classes in (10, 5):
        check_weights_fit("test_resnet", files / "teacher.pth", classes, 1)
    check_weights_fit("test_resnet", files / "teacher", 10, 1)
    with pytest.raises(ModelNotFoundError, match=r"does not fit model 'resnet10t' \(tensors in the file the model"):
        check_weights_fit("resnet10t", files / "teacher.pth", 10, 1)
