"""Progress people can read: one live line per stage (epoch, step, img/s, teacher wait, ETA) instead of Ray's logs.

Rank 0 of a training job keeps ``progress.json`` in the run directory (:class:`ProgressWriter`: rewritten atomically
at most once a second, with its counters and its own log lines). The driver polls that file (:class:`ProgressView`)
and draws one line, rewritten in place on a terminal; when its output is a file or a pipe (CI, `ray job logs`) it
prints a plain line every ``plain_every_s`` instead. The worker's log lines (epoch summaries, resume notes) are
printed once each, above the live line. Plain Python, no Ray: the file works wherever the run directory is shared.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from meal_ray.files import write_text_atomic

PROGRESS_FILE = "progress.json"
KEPT_MESSAGES = 100  # the newest worker log lines kept in the file (the view reads it twice a second)
KEPT_METRICS = 16  # the newest epochs' metrics kept in it (an epoch takes seconds at least; the view reads them all)


def format_duration(seconds: Optional[float]) -> str:
    """``1h02m``, ``4m05s``, ``12s``; ``?`` while unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class ProgressWriter:
    """Rank 0's side: counts steps and writes what the driver shows. ``clock`` is injectable for tests."""

    def __init__(self, path: str | Path, stage: str, epochs: int, teachers: bool = True, interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.path, self.clock, self.interval_s, self.teachers = Path(path), clock, interval_s, teachers
        self.state = {"attempt": uuid.uuid4().hex[:8], "stage": stage, "epoch": 0, "epochs": epochs,
                      "step": 0, "steps": 0, "images_per_s": None, "teacher_wait": None, "eta_s": None,
                      "message_count": 0, "messages": [], "metrics_count": 0, "metrics": []}
        self._started = self._last = clock()  # this attempt's start; the end of the last step
        self._done = 0  # steps since the start
        self._window = (self._started, 0)  # (time, images) at the last write, for img/s
        self._epoch_start, self._epoch_wait = self._started, 0.0
        self._written = float("-inf")

    def message(self, text: str) -> None:
        """A log line the driver prints once (epoch summaries, resume notes); written at once."""
        self.state["messages"] = (self.state["messages"] + [text])[-KEPT_MESSAGES:]
        self.state["message_count"] += 1
        self.write()

    def metrics(self, record: dict) -> None:
        """An epoch's metrics (with their ``epoch``) for the driver, which owns the MLflow run; written at once."""
        self.state["metrics"] = (self.state["metrics"] + [record])[-KEPT_METRICS:]
        self.state["metrics_count"] += 1
        self.write()

    def step(self, epoch: int, step: int, steps: int, images: int, wait_s: float = 0.0) -> None:
        """Step ``step`` (1-based) of ``steps`` in epoch ``epoch`` (0-based) done; ``images`` over all workers."""
        now = self.clock()
        if step == 1:
            self._epoch_start, self._epoch_wait = self._last, 0.0
            if self._done:  # the window since the last epoch's end holds its validation: img/s restarts here
                self._window = (now, -images)
        self._last = now
        self._done += 1
        self._epoch_wait += wait_s
        since, seen = self._window
        self._window = (since, seen + images)
        remaining = (self.state["epochs"] - epoch - 1) * steps + (steps - step)
        self.state.update(epoch=epoch + 1, step=step, steps=steps,
                          eta_s=remaining * (now - self._started) / self._done)
        if now - self._written >= self.interval_s or step == steps:
            if now > since and seen + images > 0:
                self.state["images_per_s"] = (seen + images) / (now - since)
            if self.teachers and now > self._epoch_start:
                self.state["teacher_wait"] = min(1.0, self._epoch_wait / (now - self._epoch_start))
            self._window = (now, 0)
            self.write(now)

    def write(self, now: Optional[float] = None) -> None:
        self._written = self.clock() if now is None else now
        try:
            write_text_atomic(self.path, json.dumps(dict(self.state, updated=time.time())))
        except OSError:  # progress is for people; never fail training over it
            pass


class ProgressView:
    """The driver's side: a thread that polls ``progress.json`` and shows it.

    ``print_line`` gets the permanent lines (the worker's messages; on a pipe also the plain progress lines),
    ``on_metrics`` each epoch's metrics once. ``suffix(eta_s)`` adds to the live line (the demo's whole-demo ETA).
    ``stream`` is where a terminal's live line is drawn; a stream that is not a TTY gets none.
    """

    def __init__(self, path: str | Path, print_line: Callable[[str], None] = print, stream=None,
                 plain_every_s: float = 30.0, poll_s: float = 0.5,
                 suffix: Callable[[Optional[float]], str] = lambda eta: "", label: str = "",
                 on_metrics: Callable[[dict], None] = lambda record: None):
        self.path, self.print_line, self.poll_s, self.plain_every_s = Path(path), print_line, poll_s, plain_every_s
        self.on_metrics, self._metrics_seen = on_metrics, 0
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.suffix, self.label = suffix, label
        self._attempt, self._printed, self._live = None, 0, False
        self._last_plain = time.monotonic()
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "ProgressView":
        self._thread = threading.Thread(target=self._run, name="meal-ray-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll(final=True)
        self._clear()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def poll(self, final: bool = False) -> None:
        state = self.read()
        if state is not None:
            if state.get("attempt") != self._attempt:  # a restarted worker group numbers its records anew
                self._attempt, self._printed, self._metrics_seen = state.get("attempt"), 0, 0
            for text in _unseen(state, "messages", "message_count", self._printed):
                self._clear()
                self.print_line(f"[meal-ray] {text}")
            self._printed = state.get("message_count", 0)
            for record in _unseen(state, "metrics", "metrics_count", self._metrics_seen):
                self.on_metrics(record)
            self._metrics_seen = state.get("metrics_count", 0)
        if final:
            return
        line = self.render(state)
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns
            self.stream.write("\r\x1b[K" + line[: width - 1])
            self.stream.flush()
            self._live = True
        elif time.monotonic() - self._last_plain >= self.plain_every_s:
            self._last_plain = time.monotonic()
            self.print_line(f"[meal-ray] {line}")

    def render(self, state: Optional[dict]) -> str:
        label = self.label or (state or {}).get("stage", "")
        if not state or not state.get("steps"):
            return f"{label}: starting ({format_duration(time.monotonic() - self._started)})" + self.suffix(None)
        parts = [f"{label}: epoch {state['epoch']}/{state['epochs']}", f"step {state['step']}/{state['steps']}"]
        if state.get("images_per_s"):
            parts.append(f"{state['images_per_s']:.0f} img/s")
        if state.get("teacher_wait") is not None:
            parts.append(f"teacher wait {100 * state['teacher_wait']:.1f}%")
        parts.append(f"ETA {format_duration(state.get('eta_s'))}")
        return " | ".join(parts) + self.suffix(state.get("eta_s"))

    def _clear(self) -> None:
        if self._live:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._live = False


def _unseen(state: dict, key: str, count_key: str, seen: int) -> list:
    """The records of ``state[key]`` (the kept tail of ``state[count_key]`` written in all) after the first ``seen``."""
    records, count = state.get(key, []), state.get(count_key, 0)
    return records[max(0, len(records) - (count - seen)):] if count > seen else []
