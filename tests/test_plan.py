"""`meal-ray plan`: replicas per teacher from the students' demand, written as a valid Serve config."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from meal_ray.cli import main
from meal_ray.config import load_app_config, load_config, read_yaml
from meal_ray.errors import ConfigError
from meal_ray.serve.app import resolve_teachers
from meal_ray.serve.rates import Rate, read_rates_file, shipped_table, write_rates_file
from meal_ray.train.plan import (
    TeacherPlan,
    TimingProgress,
    format_bill,
    job_costs,
    known_rates,
    one_worker_job,
    plan_replicas,
    predict_served,
    teacher_input_size,
)

ROOT = Path(__file__).resolve().parent.parent


def _serve_config(tmp_path, teachers, emulate=None):
    args = {"teachers": [dict(t, name=n) for t, n in zip(teachers, ("small", "tiny10t"))], "max_batch_size": 32}
    if emulate:
        args["emulate"] = emulate
    path = tmp_path / "teachers.yaml"
    path.write_text(yaml.safe_dump({"applications": [{
        "name": "meal-ray-teachers", "import_path": "meal_ray.serve.app:build_app", "route_prefix": None,
        "args": args,
        "deployments": [{"name": "small", "num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
                        {"name": "tiny10t", "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}]}]}))
    return path


def _job(tmp_path, teachers):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "name": "plan-test", "data": {"dataset": "fashion-mnist", "image_size": 28, "mean": [0.286], "std": [0.353],
                                      "train_subset": 512},
        "student": {"model": "test_efficientnet", "num_classes": 10},
        "teachers": {"source": "served", "models": teachers},
        "optim": {"batch_size": 64}, "run": {"num_workers": 2}}))
    return path


def test_replicas_keep_every_teacher_below_the_headroom():
    plans = plan_replicas(1800, {"a": 800, "b": 1500, "c": 2250}, headroom=1.25)
    assert [p.replicas for p in plans] == [3, 2, 1]  # 2250 * 0.8 = 1800 exactly: one replica suffices
    assert [p.utilization for p in plans] == pytest.approx([1800 / 2400, 1800 / 3000, 1800 / 2250])
    assert plan_replicas(1000, {"a": 500}, headroom=1.0)[0].replicas == 2
    with pytest.raises(ConfigError, match="must be >= 1"):
        plan_replicas(1000, {"a": 500}, headroom=0.9)
    with pytest.raises(ConfigError, match="demand must be positive"):
        plan_replicas(0, {"a": 500})


def test_the_served_model_goes_at_the_slower_of_the_students_served_pace_and_the_teachers_capacity():
    plans = [TeacherPlan("a", "a", 400.0, "given", 2, 0.0), TeacherPlan("b", "b", 1000.0, "given", 1, 0.0)]
    assert predict_served(1000, plans) == (800, {"a": 1.0, "b": 0.8})  # a's 2 replicas: the bottleneck
    # the served client's own cost (ceiling 0.7) slows the students below a's capacity: both teachers idle more
    pace, busy = predict_served(1000, plans, ceiling=0.7)
    assert pace == pytest.approx(700) and busy == pytest.approx({"a": 700 / 800, "b": 0.7})
    with pytest.raises(ConfigError, match="ceiling is a ratio"):
        predict_served(1000, plans, ceiling=0)


def test_plan_measures_writes_a_valid_serve_config_and_refuses_impossible_inputs(tmp_path, tiny_teachers):
    from ray.serve.schema import ServeDeploySchema

    serve_path, job = _serve_config(tmp_path, tiny_teachers), _job(tmp_path, tiny_teachers)
    runner = CliRunner()
    # both teachers timed here (tiny models on CPU), the student measured with the job's engine
    res = runner.invoke(main, ["plan", "--config", str(job), "--serve-config", str(serve_path), "--seconds", "0.3",
                               "--output", str(tmp_path / "planned.yaml")])
    assert res.exit_code == 0, res.output
    assert "| small | test_resnet |" in res.output and "| measured |" in res.output
    # what is timed, k/n, and an ETA, before and after each (the student first, at its per-worker batch)
    assert "[plan] timing 1/3: the student test_efficientnet (cpu, batch 32 per worker)" in res.output
    assert "[plan] timing 3/3: one test_resnet replica" in res.output or "[plan] timing 3/3: one resnet10t" \
        in res.output
    assert res.output.count(" to go for this one") >= 3 and "[plan]   3/3 done in" in res.output
    assert "the job: 180 epochs x 512 images" in res.output  # the bill: data.train_subset images per epoch
    hard = one_worker_job(load_config(str(job)))
    assert (hard.optim.batch_size, hard.run.num_workers, hard.mode, hard.teachers.source) == (32, 1, "pretrain",
                                                                                                "none")
    planned = yaml.safe_load((tmp_path / "planned.yaml").read_text())
    ServeDeploySchema.model_validate(planned)
    deployments = {d["name"]: d for d in planned["applications"][0]["deployments"]}
    assert "autoscaling_config" not in deployments["tiny10t"]
    # each teacher's replicas, as printed and as written, are the fewest at most 80% busy (headroom 1.25) at the
    # printed rates (rounded to whole numbers: 1% slack)
    demand = float(re.search(r"= (\d+) crops/s to every teacher", res.output).group(1))
    rows = re.findall(r"^\| (\S+) \| \S+ \| (\d+) \| measured \| (\d+) \| (\d+)% \|$", res.output, re.M)
    assert sorted(r[0] for r in rows) == ["small", "tiny10t"], res.output
    for name, rate, replicas, busy in rows:
        rate, replicas = float(rate), int(replicas)
        assert deployments[name]["num_replicas"] == replicas
        assert replicas * rate >= 0.99 * 1.25 * demand
        assert replicas == 1 or (replicas - 1) * rate < 1.01 * 1.25 * demand
        assert abs(int(busy) - 100 * demand / (replicas * rate)) <= 1
    # given throughputs: nothing is timed, the numbers decide; --autoscale writes bounds
    res = runner.invoke(main, ["plan", "--config", str(job), "--serve-config", str(serve_path), "--autoscale",
                               "--teacher-throughput", "small=300", "--teacher-throughput", "tiny10t=2000",
                               "--student-throughput", "400", "--output", str(tmp_path / "auto.yaml")])
    assert res.exit_code == 0, res.output
    auto = yaml.safe_load((tmp_path / "auto.yaml").read_text())["applications"][0]["deployments"]
    auto = {d["name"]: d for d in auto}
    assert auto["small"]["autoscaling_config"]["min_replicas"] == 4  # 800 crops/s * 1.25 / 300 -> 4
    assert auto["small"]["autoscaling_config"]["max_replicas"] == 8 and "num_replicas" not in auto["small"]
    assert auto["tiny10t"]["autoscaling_config"]["min_replicas"] == 1
    # --pools: the planned Serve config puts every replica (and the ingress) on the teacher pool, and the job is
    # written planned onto the student pool
    res = runner.invoke(main, ["plan", "--config", str(job), "--serve-config", str(serve_path), "--pools",
                               "--teacher-throughput", "small=300", "--teacher-throughput", "tiny10t=2000",
                               "--student-throughput", "400", "--output", str(tmp_path / "pools.yaml")])
    assert res.exit_code == 0, res.output
    pooled = yaml.safe_load((tmp_path / "pools.yaml").read_text())
    ServeDeploySchema.model_validate(pooled)
    assert {d["name"]: d["ray_actor_options"]["label_selector"] for d in pooled["applications"][0]["deployments"]} \
        == {n: {"meal-ray.io/pool": "teachers"} for n in ("small", "tiny10t", "ensemble")}
    planned_job = load_config(job.with_name(job.stem + "-planned.yaml"))
    assert planned_job.run.label_selector == {"meal-ray.io/pool": "students"}
    assert f"wrote {job.with_name(job.stem + '-planned.yaml')}" in res.output
    # emulated teachers: their configured throughput is the supply
    emulated = _serve_config(tmp_path, tiny_teachers, emulate={"crops_per_s": 500})
    res = runner.invoke(main, ["plan", "--config", str(job), "--serve-config", str(emulated),
                               "--student-throughput", "400", "--output", str(tmp_path / "emu.yaml")])
    assert res.exit_code == 0 and "| 500 | emulated | 2 | 80% |" in res.output, res.output
    # a measured served ceiling: 2 workers ask 400 x 0.6 crops/s each, 480 * 1.25 / 500 -> 2 replicas, 48% busy
    res = runner.invoke(main, ["plan", "--config", str(job), "--serve-config", str(emulated), "--served-ceiling",
                               "0.6", "--student-throughput", "400", "--output", str(tmp_path / "emu.yaml")])
    assert res.exit_code == 0 and "400 img/s x served ceiling 0.6 = 480 crops/s" in res.output, res.output
    assert "| 500 | emulated | 2 | 48% |" in res.output, res.output
    bad = [(["--teacher-throughput", "nosuch=10"], "does not deploy; its teachers: small, tiny10t"),
           (["--teacher-throughput", "small=fast"], "must look like NAME=CROPS_PER_S"),
           (["--student-throughput", "-5"], "must be a positive number"),
           (["--headroom", "0.5"], "must be >= 1"),
           (["--served-ceiling", "0"], "--served-ceiling=0.0: the served path's ceiling is a ratio of img/s")]
    if not torch.cuda.is_available():  # a GPU job is never timed on this machine's CPU: the rates must be given
        bad.append((["--set", "run.use_gpu=true", "--teacher-throughput", "small=300"],
                    "cannot be timed here: a CPU timing is no plan for a GPU cluster; the table shipped with "
                    "meal-ray has NVIDIA GeForce RTX 3090 figures for the teachers senet154 at 224 px"))
        bad.append((["--set", "run.use_gpu=true", "--time-here", "--teacher-throughput", "small=300"],
                    "measure them on a GPU with bench/gpu_check.py and pass --rates FILE"))
        res = runner.invoke(main, ["plan", "--config", str(job), "--serve-config", str(serve_path), "--set",
                                   "run.use_gpu=true", "--teacher-throughput", "small=300", "--teacher-throughput",
                                   "tiny10t=2000", "--student-throughput", "400", "--output", str(tmp_path / "g.yaml")])
        assert res.exit_code == 0 and "| small | test_resnet | 300 | given | 4 |" in res.output, res.output
    for extra, message in bad:
        res = runner.invoke(main, ["plan", "--config", str(job), "--serve-config", str(serve_path), *extra])
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output
    res = runner.invoke(main, ["plan", "--config", str(job), "--serve-config", str(ROOT / "jobs/fashion-mnist.yaml")])
    assert res.exit_code != 0 and "exactly one meal-ray teacher application" in res.output


def test_the_bill_three_ways_against_hand_arithmetic():
    # 2 workers at 100 img/s; teachers of 50 and 200 crops/s: demand 200 -> 5 and 2 replicas at headroom 1.25
    plans = plan_replicas(200, {"a": 50, "b": 200}, headroom=1.25)
    assert [p.replicas for p in plans] == [5, 2]
    bill = job_costs(images=1000, epochs=2, workers=2, student_rate=100, plans=plans, passes=3)
    authors, served, cache = bill.ways
    # one image: 0.01 s of student, 0.02 + 0.005 s of teachers; 2000 images over 2 devices
    assert authors.wall_h * 3600 == pytest.approx(2000 * 0.035 / 2)  # 35 s
    assert authors.device_h * 3600 == pytest.approx(70)
    assert (authors.teacher_devices, authors.student_devices) == (0, 2)
    assert "71% of each GPU's time" in authors.where  # 0.025 / 0.035
    assert served.wall_h * 3600 == pytest.approx(10) and served.device_h * 3600 == pytest.approx((2 + 7) * 10)
    assert served.teacher_devices == 7 and "teachers 71% busy (a 80%, b 50%)" in served.where  # 200*0.025/7
    # 3 passes of 1000 crops through both teachers on 2 devices: 37.5 s, then 10 s of distillation
    assert cache.wall_h * 3600 == pytest.approx(47.5) and cache.device_h * 3600 == pytest.approx(95)
    assert "relabel 0.01 h, then distil 0.0028 h" in cache.where
    # serving's 90 device-seconds buy 2.8 passes: 2 * (12.5 P + 10) = 90; all E passes cost the authors' 70
    assert bill.break_even_passes == pytest.approx(2.8)
    assert job_costs(1000, 2, 2, 100, plans, passes=2).ways[2].device_h == pytest.approx(authors.device_h)
    text = format_bill(bill)
    assert "| served (the replicas planned above) | 7 | 2 | 0.0028 | 0.025 |" in text
    assert "up to 3 passes" in text
    # the students measured at 0.8x their hard-label pace on the served path (the same replicas): 12.5 s on 9 devices,
    # the teachers 57% busy; the cache's 2 * (12.5 P + 10) device-seconds reach serving's 112.5 at P = 3.7
    slower = job_costs(1000, 2, 2, 100, plans, passes=3, served_ceiling=0.8)
    served_slower = slower.ways[1]
    assert served_slower.wall_h * 3600 == pytest.approx(12.5) and served_slower.device_h * 3600 == pytest.approx(112.5)
    assert "teachers 57% busy" in served_slower.where and "students at 0.8x their hard-label" in served_slower.where
    assert slower.break_even_passes == pytest.approx(3.7)
    assert slower.ways[0] == bill.ways[0] and slower.ways[2] == bill.ways[2]  # the other ways do not serve


def _rates_file(path, teachers=(), students=()):
    return write_rates_file(path, "Test GPU 80GB", list(teachers), list(students), [])


def test_rates_come_from_the_command_line_then_the_rates_file_then_the_shipped_table(tmp_path):
    cfg = load_config(str(ROOT / "jobs/imagenet-resnet50-224.yaml"))
    app = load_app_config(read_yaml(str(ROOT / "deployments/imagenet-224.yaml"))["applications"][0]["args"])
    specs = resolve_teachers(app, check_files=False)
    sizes = {s["name"]: teacher_input_size(s, 224) for s in specs}
    assert sizes == {"senet154": 224, "resnet152s": 224}
    fig = dict(img_size=224, batch=64, precision="fp32")
    path = _rates_file(tmp_path / "rates.json", [
        dict(fig, model="senet154", samples_per_s=111.0),  # the architecture: used only without the exact name
        dict(fig, model="senet154.gluon_in1k", samples_per_s=500.0),
        dict(fig, model="resnet152s.gluon_in1k", samples_per_s=400.0, precision="bf16")],  # not the app's fp32
        [dict(fig, model="resnet50", samples_per_s=700.0)])
    measured, table = read_rates_file(str(path)), shipped_table()
    student, teachers = known_rates(cfg, app, specs, sizes, {"resnet152s": 999.0}, None, [measured, table])
    assert (student.value, student.source) == (700.0, "rates file") and "Test GPU 80GB" in student.detail
    assert (teachers["senet154"].value, teachers["senet154"].source) == (500.0, "rates file")
    assert (teachers["resnet152s"].value, teachers["resnet152s"].source) == (999.0, "given")
    # without the command line: the bf16 figure is not the app's precision, so the table's fp16 figure is taken
    student, teachers = known_rates(cfg, app, specs, sizes, {}, 321.0, [measured, table])
    assert student == Rate(321.0, "given")
    assert (teachers["resnet152s"].value, teachers["resnet152s"].source) == (1245.59, "table")
    assert teachers["resnet152s"].precision == "fp16" and "benchmark-infer-amp" in teachers["resnet152s"].detail
    # the shipped table alone; a model it does not hold is left to time (None)
    student, teachers = known_rates(cfg, app, specs, sizes, {}, None, [table])
    assert (student.value, teachers["senet154"].value) == (826.06, 671.82)
    assert known_rates(dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, model="resnet18")), app,
                       specs, sizes, {}, None, [table])[0] is None
    estimated = table.student("resnet50", 380, "fp32")
    assert estimated.value == pytest.approx(826.06 * (224 / 380) ** 2, abs=0.01) and "by FLOPs" in estimated.detail


def test_a_rates_file_round_trip_and_what_it_refuses(tmp_path):
    fig = dict(model="tf_efficientnet_b4.ns_jft_in1k", img_size=380, batch=96, precision="bf16", samples_per_s=1234.5)
    path = _rates_file(tmp_path / "r.json", [fig], [dict(fig, model="resnet50", samples_per_s=88.0)])
    back = read_rates_file(str(path))
    assert back.device == "Test GPU 80GB" and back.teacher(fig["model"], 380, "bf16").value == 1234.5
    assert back.teacher("tf_efficientnet_b4.aa_in1k", 380, "bf16").value == 1234.5  # same architecture
    assert back.teacher(fig["model"], 380, "fp32") is None and back.student("resnet50", 380, "bf16").value == 88.0
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically
    bad = {"missing.json": None, "notjson.json": "{", "other.json": json.dumps({"device": "x"}),
           "negative.json": json.dumps({"meal_ray_rates": 1, "device": "x", "teachers": [dict(fig, samples_per_s=-1)]}),
           "fields.json": json.dumps({"meal_ray_rates": 1, "device": "x", "students": [{"model": "resnet50"}]})}
    for name, text in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match="bench/gpu_check.py|positive samples_per_s"):
            read_rates_file(str(tmp_path / name))
    with pytest.raises(ConfigError, match="positive samples_per_s"):
        _rates_file(tmp_path / "w.json", [dict(fig, samples_per_s=0)])


def test_a_gpu_job_is_planned_from_the_shipped_table_without_timing_anything(tmp_path):
    runner = CliRunner()
    args = ["plan", "--config", str(ROOT / "jobs/imagenet-resnet50-224.yaml"), "--serve-config",
            str(ROOT / "deployments/imagenet-224.yaml"), "--output", str(tmp_path / "p.yaml")]
    res = runner.invoke(main, [*args, "--train-images", "1281167"])
    assert res.exit_code == 0, res.output
    assert "[plan] timing" not in res.output and "figures marked table come from the table shipped" in res.output
    assert ("this machine has no GPU" in res.output) == (not torch.cuda.is_available())
    assert "| senet154 | senet154.gluon_in1k | 672 | table | 13 | 76% |" in res.output
    assert "| resnet152s | resnet152s.gluon_in1k | 1246 | table | 7 | 76% |" in res.output
    assert "note: figures at another precision than the job's: the student fp16 AMP (runs fp32" in res.output
    # 180 x 1281167 images over 8 GPUs at 826.06 img/s and 1 / (1/826.06 + 1/671.82 + 1/1245.59) = 286 img/s
    assert "| authors' (every student GPU runs every teacher) | 0 | 8 | 28.0 | 224 |" in res.output
    assert "| served (the replicas planned above) | 20 | 8 | 9.7 | 271 |" in res.output
    assert "| cache (1 pass relabelled, then distilled) | 8 | 8 | 9.8 | 78.4 |" in res.output
    planned = yaml.safe_load((tmp_path / "p.yaml").read_text())["applications"][0]["deployments"]
    assert [d["num_replicas"] for d in planned[:2]] == [13, 7]
    # an image folder's size is not counted: the bill asks for it; the command line still wins over the table
    res = runner.invoke(main, [*args, "--teacher-throughput", "senet154=500", "--passes", "4"])
    assert res.exit_code == 0 and "| senet154 | senet154.gluon_in1k | 500 | given | 17 |" in res.output, res.output
    assert "the bill needs the training set's size: give --train-images N" in res.output
    for extra, message in ((["--passes", "0"], "--passes=0 must be >= 1"),
                           (["--train-images", "0"], "--train-images=0 must be >= 1"),
                           (["--rates", str(tmp_path / "none.json")], "no such file")):
        res = runner.invoke(main, [*args, *extra])
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output


def test_timing_here_says_what_it_times_and_when_it_will_be_done():
    lines, now = [], [0.0]
    progress = TimingProgress(3, lines.append, every_s=10, clock=lambda: now[0])
    progress.begin("one senet154 replica (cpu, batch 256)")
    now[0] = 60.0
    progress.left(60.0)  # the warm-up batch took a minute: a minute to go for this one, 3 for all
    now[0] = 65.0
    progress.left(55.0)  # within every_s: quiet
    now[0] = 120.0
    progress.end("1.3 crops/s")
    assert lines == ["[plan] timing 1/3: one senet154 replica (cpu, batch 256) ...",
                     "[plan]   1/3: ~1m00s to go for this one, ~5m00s for all 3 left",
                     "[plan]   1/3 done in 2m00s: 1.3 crops/s; ~4m00s left for the other 2"]
