"""The live progress line: what rank 0 writes, what the driver shows on a terminal and on a pipe, the demo's ETA."""

from __future__ import annotations

import io
import json

from meal_ray.progress import ProgressView, ProgressWriter, format_duration


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_writer_counts_steps_and_estimates_the_time_left(tmp_path):
    clock, path = Clock(), tmp_path / "progress.json"
    writer = ProgressWriter(path, "quick", epochs=2, teachers=True, interval_s=1.0, clock=clock)
    for step in range(1, 6):  # 5 of 2 x 10 steps, 1 s each, 128 images, 0.25 s of it waiting for teachers
        clock.now += 1.0
        writer.step(0, step, 10, images=128, wait_s=0.25)
    state = json.loads(path.read_text())
    assert (state["epoch"], state["step"], state["steps"], state["epochs"]) == (1, 5, 10, 2)
    assert state["eta_s"] == 15.0  # 15 steps left at the measured 1 s per step
    assert state["images_per_s"] == 128.0 and state["teacher_wait"] == 0.25
    writer.message("epoch 1/2 | loss 1.0")
    assert json.loads(path.read_text())["messages"] == ["epoch 1/2 | loss 1.0"]
    assert [format_duration(s) for s in (None, 12, 245, 3725)] == ["?", "12s", "4m05s", "1h02m"]


def test_view_draws_one_live_line_on_a_terminal_and_plain_lines_on_a_pipe(tmp_path):
    clock, path = Clock(), tmp_path / "progress.json"
    writer = ProgressWriter(path, "quick", epochs=2, teachers=False, clock=clock)
    printed, terminal = [], Terminal()
    view = ProgressView(path, print_line=printed.append, stream=terminal, suffix=lambda eta: " | demo ETA 9m",
                        label="distill quick")
    view.poll()
    assert "distill quick: starting" in terminal.getvalue() and printed == []
    clock.now += 2.0
    writer.step(0, 1, 4, images=64)
    writer.message("resumed from checkpoint at epoch 1")
    view.poll()
    live = terminal.getvalue().rsplit("\r\x1b[K", 1)[-1]
    assert live == "distill quick: epoch 1/2 | step 1/4 | 32 img/s | ETA 14s | demo ETA 9m"  # no teacher wait
    assert printed == ["[meal-ray] resumed from checkpoint at epoch 1"]
    view.poll()
    assert len(printed) == 1  # each worker line once
    # a restarted worker group writes a new attempt whose lines count from 0 again: they are all new
    ProgressWriter(path, "quick", epochs=2, clock=clock).message("restarted")
    view.poll()
    assert printed[-1] == "[meal-ray] restarted"

    pipe_lines: list = []
    pipe = ProgressView(path, print_line=pipe_lines.append, stream=io.StringIO(), plain_every_s=0.0)
    pipe.poll()
    assert pipe_lines == ["[meal-ray] restarted", "[meal-ray] quick: starting (0s)"]  # plain text, no escapes


def test_demo_eta_adds_the_stages_left_at_the_measured_pace():
    from meal_ray.demo.stages import DemoClock

    clock = DemoClock([("resnet18", 100), ("resnet10t", 100), ("mobilenet", 50)])  # epochs x images each
    assert clock.start("resnet18", 100) == "stage 1/3"
    assert clock.suffix(None) == " | demo: stage 1/3, ETA ?"
    clock.started -= 10.0  # 10 s into the first stage, 10 s to go: 0.2 s per unit of work
    assert clock.suffix(10.0) == " | demo: stage 1/3, ETA 40s"  # 10 s + 150 units x 0.2 s
    clock.finish(trained=True)
    clock.start("resnet10t", 0)
    clock.finish(trained=False)  # reused: free
    assert clock.start("mobilenet", 50) == "stage 3/3"
    assert clock.suffix(5.0) == " | demo: stage 3/3, ETA 5s"


def test_demo_eta_prices_each_kind_of_work_at_its_own_pace_and_skips_finished_stages():
    """A teacher, a reused init (planned with no work), a relabel and two student arms: the relabel and the students
    go at their own measured paces once measured, not at the teacher's."""
    from meal_ray.demo.stages import DemoClock

    clock = DemoClock([("resnet18", 100), ("student", 0), ("relabel", 200), ("student", 50), ("student", 50)])
    clock.start("resnet18", 100)
    clock.started -= 20.0
    assert clock.suffix(0.0) == " | demo: stage 1/5, ETA 1m00s"  # 300 units of kinds not measured, at 0.2 s
    clock.finish(trained=True)  # the teacher: 0.2 s per image
    clock.start("student", 0)
    assert clock.suffix(None) == " | demo: stage 2/5, ETA 1m00s"  # the reused stage and the rest, at 0.2 s
    clock.finish(trained=False)
    assert clock.start("relabel", 200) == "stage 3/5"
    clock.started -= 10.0
    # the relabel itself: 10 s in, 10 s to go (0.1 s per crop); the students, not measured yet: the teacher's pace
    assert clock.suffix(10.0) == " | demo: stage 3/5, ETA 30s"
    clock.started -= 10.0
    clock.finish(trained=True, work=200)  # 20 s for 200 crops
    clock.start("student", 50)
    clock.started -= 4.0
    assert clock.suffix(1.0) == " | demo: stage 4/5, ETA 6s"  # 1 s + 50 images at this stage's own 0.1 s
    clock.started -= 1.0
    clock.finish(trained=True)  # 5 s for 50 images
    clock.start("student", 50)
    assert clock.suffix(None) == " | demo: stage 5/5, ETA 5s"  # a measured kind: 50 x 0.1 s before any step
    clock.finish(trained=True)
    clock.start("student", 50)  # a stage the plan did not count is counted when it starts
    assert clock.suffix(None).startswith(" | demo: stage 6/6")


def test_epoch_metrics_reach_the_driver_once_each_for_its_mlflow_run(tmp_path):
    """Rank 0 hands each epoch's metrics to the driver (the MLflow run's one writer) through the progress file: each
    record once however often the view polls, the newest KEPT_METRICS kept, a restarted group's counted anew."""
    from meal_ray.progress import KEPT_METRICS

    path, got = tmp_path / "progress.json", []
    writer = ProgressWriter(path, "quick", epochs=40)
    view = ProgressView(path, print_line=lambda s: None, stream=io.StringIO(), on_metrics=got.append)
    writer.metrics({"epoch": 1, "val_top1": 50.0})
    view.poll()
    view.poll()
    writer.metrics({"epoch": 2, "val_top1": 60.0})
    writer.metrics({"epoch": 3, "val_top1": 65.0})
    view.poll(final=True)
    assert [m["epoch"] for m in got] == [1, 2, 3] and got[1]["val_top1"] == 60.0
    for epoch in range(4, 4 + KEPT_METRICS + 5):
        writer.metrics({"epoch": epoch})
    assert len(json.loads(path.read_text())["metrics"]) == KEPT_METRICS
    restarted = ProgressWriter(path, "quick", epochs=40)  # a new worker group, from the last checkpoint
    restarted.metrics({"epoch": 3, "val_top1": 65.0})
    view.poll()
    assert got[-1] == {"epoch": 3, "val_top1": 65.0}
