"""bench/gpu_check.py runs its CPU smoke mode (tiny models, the same code paths as on a GPU: teachers timed,
the student through the Engine, the student on teachers served by meal-ray's Serve app in its own embedded Ray) and
`meal-ray plan --rates` plans from the file it wrote, timing nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from meal_ray.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # an embedded Ray and Serve in the subprocess; ~25 s on 2 cores
def test_gpu_check_writes_rates_that_plan_reads(tmp_path):
    out = tmp_path / "rates.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray, not the session's
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--cpu", "--output", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rates = json.loads(out.read_text())
    assert rates["device"].startswith("cpu") and rates["torch"] and rates["date"]
    assert {(t["model"], t["precision"]) for t in rates["teachers"]} == {
        (m, p) for m in ("test_resnet", "test_efficientnet") for p in ("fp32", "bf16")}
    assert [s["model"] for s in rates["students"]] == ["test_resnet"] and rates["students"][0]["batch"] == 4
    served = rates["served"][0]
    assert 0 < served["samples_per_s"] and served["hard_samples_per_s"] == rates["students"][0]["samples_per_s"]
    case = rates["cases"][0]
    assert f"meal-ray plan --config {case['job']} --serve-config {case['serve_config']} --rates {out}" in proc.stdout
    res = CliRunner().invoke(main, ["plan", "--config", case["job"], "--serve-config", case["serve_config"],
                                    "--rates", str(out), "--train-images", "1000", "--output",
                                    str(tmp_path / "planned.yaml")])
    assert res.exit_code == 0, res.output
    assert "[plan] timing" not in res.output and res.output.count("| rates file |") == 2
    student = rates["students"][0]["samples_per_s"]
    assert f"students: 8 worker(s) x {student:.0f} img/s" in res.output
    assert "the student on served teachers sharing that one device" in res.output
    assert "| cache (1 pass relabelled, then distilled) | 8 | 8 |" in res.output
