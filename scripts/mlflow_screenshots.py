"""Screenshots of the MLflow UI as a meal-ray user finds it after the demo, taken with headless Chromium.

Starts a real `mlflow server` on the demo's store, opens the pages a user opens (the demo's runs with the stages
nested, the MEAL V2 stage's run page, its charts, the parent run's control-vs-MEAL-V2 plot) and saves one PNG per
page. The PNGs in docs/ were made with it after `make demo-quick`.

    .venv/bin/pip install -e '.[docs]'   # playwright, the Python package only: it drives the system's Chromium
    apt-get install chromium             # Debian's package: /usr/bin/chromium (or --chromium PATH)
    .venv/bin/python scripts/mlflow_screenshots.py --tracking-uri sqlite:///$PWD/mlflow.db --out docs
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

#: Chromium flags for a machine with no display and no outside network (the background-networking ones stop it from
#: calling Google's hosts at every start).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tracking_uri: str, port: int, log_path: Path) -> subprocess.Popen:
    """A real `mlflow server` on the store, as `mlflow ui` starts it; returns once /health answers."""
    mlflow = Path(sys.executable).with_name("mlflow")
    log = open(log_path, "w")
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"mlflow server exited (code {proc.returncode}); its log: {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    sys.exit(f"mlflow server did not answer within 120 s; its log: {log_path}")


def demo_runs(tracking_uri: str, experiment: str):
    """(experiment id, the latest demo parent run, its MEAL V2 stage run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        sys.exit(f"no experiment {experiment!r} in {tracking_uri}: run `make demo-quick` first, or pass --experiment")
    parents = client.search_runs([exp.experiment_id], "tags.`mlflow.runName` LIKE 'demo-%'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        sys.exit(f"no demo run in experiment {experiment!r}: run `make demo-quick` first")
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    meal = [r for r in children if r.data.tags.get("meal_ray.mode") == "distill"
            and r.data.tags.get("meal_ray.teacher_source") != "cache"]
    if not meal:
        sys.exit(f"demo run {parent.info.run_id} has no MEAL V2 stage run")
    return exp.experiment_id, parent, meal[0]


def shoot(page, url: str, wait_text: str, out: Path, height: int = 1000, clicks: tuple = ()) -> None:
    """Open ``url``, wait for ``wait_text``, close the assistant panel, click ``clicks`` (CSS or text=...), save."""
    page.set_viewport_size({"width": 1600, "height": height})
    page.goto(url)
    try:
        page.get_by_text(wait_text, exact=False).first.wait_for(timeout=60_000)
    except Exception:
        page.screenshot(path=str(out.with_suffix(".failed.png")))
        raise
    page.wait_for_timeout(1500)
    close = page.get_by_role("button", name="Close")  # MLflow 3's assistant side panel: not what a user looks at
    if close.count():
        close.first.click()
    for selector in clicks:
        page.locator(selector).first.click()
    page.wait_for_timeout(4000)  # charts and images draw after their data arrives (the UI polls: no network idle)
    page.screenshot(path=str(out))
    print(f"wrote {out}  ({url})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    ap.add_argument("--experiment", default="meal-ray-demo")
    ap.add_argument("--out", default="docs", type=Path)
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    args = ap.parse_args()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("this script needs the playwright package: pip install -e '.[docs]' (no browser download needed)")
    if not Path(args.chromium).exists():
        sys.exit(f"no Chromium at {args.chromium}: apt-get install chromium, or pass --chromium PATH")

    exp_id, parent, meal = demo_runs(args.tracking_uri, args.experiment)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(args.tracking_uri, port, args.out / ".mlflow-server.log")
    base = f"http://127.0.0.1:{port}/#/experiments/{exp_id}"
    wf = "workflowType=machine_learning"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page()
            # the runs table with the demo's parent run expanded: one nested run per stage
            shoot(page, f"{base}/runs?{wf}", parent.info.run_name, args.out / "mlflow-demo-runs.png",
                  height=600, clicks=("button[data-component-id*=runnamecellrenderer]",))
            shoot(page, f"{base}/runs/{meal.info.run_id}?{wf}", "Parameters", args.out / "mlflow-run-overview.png",
                  height=1500)
            # the per-epoch charts (the per-class final accuracies, one point each, folded away)
            shoot(page, f"{base}/runs/{meal.info.run_id}/model-metrics?{wf}", "Ankle boot",
                  args.out / "mlflow-run-charts.png", height=1300, clicks=('text="val_acc"',))
            shoot(page, f"{base}/runs/{parent.info.run_id}/artifacts?{wf}", "arms_test_top1.png",
                  args.out / "mlflow-demo-plots.png", clicks=("text=arms_test_top1.png",))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
        (args.out / ".mlflow-server.log").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
