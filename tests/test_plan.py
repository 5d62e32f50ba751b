"""`meal-ray plan`: replicas per teacher from the students' demand, written as a valid Serve config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from meal_ray.cli import main
from meal_ray.config import load_config
from meal_ray.errors import ConfigError
from meal_ray.serve.plan import plan_replicas

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
    assert all(p.utilization <= 0.8 + 1e-9 and p.expected_wait == 0 for p in plans)
    assert plan_replicas(1000, {"a": 500}, headroom=1.0)[0].replicas == 2
    with pytest.raises(ConfigError, match="must be >= 1"):
        plan_replicas(1000, {"a": 500}, headroom=0.9)
    with pytest.raises(ConfigError, match="demand must be positive"):
        plan_replicas(0, {"a": 500})


def test_plan_measures_writes_a_valid_serve_config_and_refuses_impossible_inputs(tmp_path, tiny_teachers):
    from ray.serve.schema import ServeDeploySchema

    serve_path, job = _serve_config(tmp_path, tiny_teachers), _job(tmp_path, tiny_teachers)
    runner = CliRunner()
    # both teachers timed here (tiny models on CPU), the student measured with the job's engine
    res = runner.invoke(main, ["plan", "--config", str(job), "--serve-config", str(serve_path), "--seconds", "0.3",
                               "--output", str(tmp_path / "planned.yaml")])
    assert res.exit_code == 0, res.output
    assert "| small | test_resnet |" in res.output and "| measured |" in res.output
    planned = yaml.safe_load((tmp_path / "planned.yaml").read_text())
    ServeDeploySchema.model_validate(planned)
    deployments = {d["name"]: d for d in planned["applications"][0]["deployments"]}
    assert deployments["small"]["num_replicas"] >= 1 and "autoscaling_config" not in deployments["tiny10t"]
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
    bad = [(["--teacher-throughput", "nosuch=10"], "does not deploy; its teachers: small, tiny10t"),
           (["--teacher-throughput", "small=fast"], "must look like NAME=CROPS_PER_S"),
           (["--student-throughput", "-5"], "must be a positive number"),
           (["--headroom", "0.5"], "must be >= 1")]
    if not torch.cuda.is_available():  # a GPU job is never timed on this machine's CPU: the rates must be given
        bad.append((["--set", "run.use_gpu=true", "--teacher-throughput", "small=300"],
                    "cannot be timed here: a CPU timing is no plan for a GPU cluster"))
        res = runner.invoke(main, ["plan", "--config", str(job), "--serve-config", str(serve_path), "--set",
                                   "run.use_gpu=true", "--teacher-throughput", "small=300", "--teacher-throughput",
                                   "tiny10t=2000", "--student-throughput", "400", "--output", str(tmp_path / "g.yaml")])
        assert res.exit_code == 0 and "| small | test_resnet | 300 | given | 4 |" in res.output, res.output
    for extra, message in bad:
        res = runner.invoke(main, ["plan", "--config", str(job), "--serve-config", str(serve_path), *extra])
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output
    res = runner.invoke(main, ["plan", "--config", str(job), "--serve-config", str(ROOT / "jobs/fashion-mnist.yaml")])
    assert res.exit_code != 0 and "exactly one meal-ray teacher application" in res.output
