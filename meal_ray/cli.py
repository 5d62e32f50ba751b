"""`meal-ray` command line: init, pretrain, distill, evaluate, teachers up|status|down, demo, data."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from meal_ray.config import DEFAULT_APP_NAME
from meal_ray.errors import MealRayError
from meal_ray.source_registry import describe_sources


def friendly_errors(fn):
    """Print MealRayError messages (which name the problem and the fix) without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MealRayError as e:
            raise click.ClickException(f"{type(e).__name__}: {e}") from None

    return wrapper


def _set_verbose(ctx, param, value):
    if value:
        import os

        from meal_ray.cluster import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"  # read by cluster.ensure_ray when Ray starts or is joined


verbose_option = click.option(
    "--verbose", is_flag=True, expose_value=False, is_eager=True, callback=_set_verbose,
    help="Show Ray's own output too (its workers' log lines, startup messages); by default only meal-ray's progress "
         "lines and results are shown (Ray's logs stay in /tmp/ray/session_latest/logs).")


@click.group()
@click.version_option(package_name="meal-ray")
def main():
    """MEAL V2 ensemble distillation with Ray Serve teachers and Ray Train students."""


# --------------------------------------------------------------------------- data


@main.group()
def data():
    """Datasets: fetch and verify."""


@data.command("fashion-mnist")
@click.option("--root", default=None, help="Folder holding the idx(.gz) files (default: search path).")
@click.option("--download", is_flag=True, help="Download from the official source if not found, verifying checksums.")
@click.option("--check", is_flag=True, help="Only verify: exit 1 if missing or corrupt.")
@friendly_errors
def data_fashion_mnist(root, download, check):
    """Find (or download) Fashion-MNIST and verify it against the official checksums."""
    from meal_ray.data import download_fashion_mnist, verify_fashion_mnist
    from meal_ray.errors import DatasetError

    try:
        path = verify_fashion_mnist(root)
    except DatasetError:
        if check or not download:
            raise
        dest = Path(root) if root else Path.home() / ".cache/meal-ray/fashion-mnist"
        click.echo(f"Downloading Fashion-MNIST to {dest} ...")
        path = verify_fashion_mnist(str(download_fashion_mnist(dest)))
    click.echo(f"Fashion-MNIST OK at {path} (checksums verified)")


# --------------------------------------------------------------------------- init


@main.command("init")
@click.option("--data", required=True, help="Your ImageNet-layout folder: DIR/train/<class>/, DIR/val/<class>/.")
@click.option("--teacher", "teachers", multiple=True, metavar="ARCH=PATH",
              help="A teacher: timm architecture = its weights (.safetensors/.pth state dict, or a meal-ray export "
                   "directory); or a bare timm hub name (1000-class folders only). Repeatable.")
@click.option("--student", default="mobilenetv3_small_050", show_default=True, help="The student's timm architecture.")
@click.option("--student-init", type=click.Choice(["pretrain", "timm", "random"]), default="pretrain",
              show_default=True,
              help="pretrain: also write pretrain.yaml (hard labels on your folder) and distill from its export; "
                   "timm: timm's pretrained weights (internet); random: from scratch.")
@click.option("--output", required=True, help="Folder for pretrain.yaml, distill.yaml, serve.yaml, teachers/, runs/.")
@click.option("--name", default=None, help="Job name prefix (default: the --output folder's name).")
@click.option("--image-size", type=int, default=None,
              help="Training crop size (default: the sampled images' median shorter side, rounded up to x8, in "
                   "[32, 224]).")
@click.option("--sample", type=int, default=500, show_default=True,
              help="Training images read to measure channels, image size and mean/std.")
@click.option("--teachers-source", type=click.Choice(["served", "local"]), default="served", show_default=True,
              help="distill.yaml's teachers.source (served: Ray Serve app of serve.yaml; local: in-process).")
@click.option("--force", is_flag=True, help="Overwrite configs already in --output.")
@click.option("--pools", is_flag=True,
              help="For a shared cluster: serve.yaml's replicas on nodes labelled meal-ray.io/pool=teachers, the "
                   "jobs' workers on meal-ray.io/pool=students.")
@friendly_errors
def init_cmd(data, teachers, student, student_init, output, name, image_size, sample, teachers_source, force, pools):
    """Write a job config (pretrain.yaml, distill.yaml) and a Serve config for your own folder and teachers, with the
    folder's class count, image size, channels and mean/std filled in."""
    from meal_ray.starter import init_job

    init_job(data, list(teachers), output, student=student, student_init=student_init, name=name,
             image_size=image_size, sample=sample, source=teachers_source, force=force, log=click.echo, pools=pools)


# --------------------------------------------------------------------------- evaluate


@main.command()
@click.option("--model", "model_dir", required=True,
              help="A meal-ray export directory (model.safetensors + config.json).")
@click.option("--dataset", default="fashion-mnist", show_default=True,
              type=click.Choice(["fashion-mnist", "imagefolder"]))
@click.option("--root", default=None, help="Dataset root (imagefolder: the folder holding val/<class>/).")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--val-subset", default=None, type=int,
              help="Evaluate on a stratified subset of this many images (as a run's data.val_subset).")
@click.option("--reliability", default=None, metavar="PNG",
              help="Also draw the reliability diagram (accuracy vs confidence, 15 bins) to this PNG file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@friendly_errors
def evaluate(model_dir, dataset, root, batch_size, val_subset, reliability, as_json):
    """Evaluate an exported student on the validation/test set with the preprocessing in its config.json: top-1/5,
    per-class accuracy and calibration (NLL, expected calibration error over 15 confidence bins)."""
    from meal_ray.evaluation import evaluate_export

    result, classes = evaluate_export(model_dir, dataset, root, batch_size, val_subset)
    if reliability:
        from meal_ray.plots import plot_reliability

        plot_reliability({Path(model_dir).name: {"reliability": result.reliability, "ece": result.ece}}, reliability,
                         f"Reliability of {model_dir} ({result.count} images)")
    if as_json:
        click.echo(json.dumps(result.to_dict(classes)))
        return
    click.echo(f"top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  NLL {result.nll:.4f}  ECE {100 * result.ece:.2f}% "
               f"({result.count} images)")
    for name, acc in zip(classes, result.per_class):
        click.echo(f"  {name:<14} {acc:6.2f}%")


# --------------------------------------------------------------------------- pretrain / distill


def _job_options(fn):
    options = [
        click.option("--config", "config_path", required=True, help="Job config YAML (see jobs/)."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a config value, e.g. --set optim.epochs=3 (repeatable)."),
        click.option("--output", default=None, help="Run directory (default runs/<name>)."),
        click.option("--tracking-uri", default=None,
                     help="MLflow tracking URI (default: sqlite mlflow.db in the working dir)."),
        click.option("--address", default=None,
                     help="Ray cluster address (default: RAY_ADDRESS, else embedded local Ray)."),
        click.option("--resume", is_flag=True, help="Continue the run in --output from its last checkpoint."),
        click.option("--overwrite", is_flag=True, help="Replace the run in --output."),
        click.option("--register", "register", default=None, metavar="NAME",
                     help="Register the final student in the MLflow model registry as NAME (a new version each run; "
                          "same as --set run.register_model=NAME)."),
        verbose_option,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _run(mode, config_path, overrides, output, tracking_uri, address, resume, overwrite, register=None):
    from meal_ray.config import load_config
    from meal_ray.train.driver import run_job

    extra = list(overrides)
    if output:
        extra.append(f"run.output={output}")
    if tracking_uri:
        extra.append(f"run.tracking_uri={tracking_uri}")
    cfg = load_config(config_path, extra)
    if register:
        cfg.run.register_model = register
    if cfg.mode != mode:
        raise click.UsageError(f"{config_path} is a mode={cfg.mode} config; use `meal-ray {cfg.mode}` for it.")
    run_job(cfg, resume=resume, overwrite=overwrite, address=address)


@main.command()
@_job_options
@friendly_errors
def pretrain(**kwargs):
    """Hard-label training (teachers, or the student's initialization) as a Ray Train job."""
    _run("pretrain", **kwargs)


@main.command(help="MEAL V2 distillation from the teacher ensemble as a Ray Train job. Soft labels come from "
                    f"teachers.source: {describe_sources(with_soft_labels_only=True)}.")
@_job_options
@friendly_errors
def distill(**kwargs):
    _run("distill", **kwargs)


@main.command()
@click.option("--config", "config_path", required=True, help="The distillation job whose crops to label (see jobs/).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a job value (repeatable).")
@click.option("--passes", type=int, required=True, help="Passes over the training set (epoch e replays pass e mod P).")
@click.option("--output", required=True, help="Cache directory (a rerun with the same config resumes it).")
@click.option("--top-k", type=int, default=None,
              help="Classes kept per crop (default: all up to 100 classes, exact; else 5, as FKD).")
@click.option("--shard-size", type=int, default=8192, show_default=True, help="Crops per Parquet shard.")
@click.option("--actors", type=int, default=None, help="Ray Data actors labelling shards (default: run.num_workers).")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else embedded local Ray).")
@verbose_option
@friendly_errors
def relabel(config_path, overrides, passes, output, top_k, shard_size, actors, address):
    """Label P passes of a job's training crops once into a soft-label cache (Parquet), for teachers.source=cache."""
    from meal_ray.config import load_config
    from meal_ray.train.relabel import relabel as run_relabel

    cfg = load_config(config_path, list(overrides))
    run_relabel(cfg, output, passes, k=top_k, shard_size=shard_size, actors=actors, address=address, log=click.echo)


@main.command()
@click.option("--config", "config_path", required=True, help="The job whose students the teachers must keep up with.")
@click.option("--serve-config", required=True, help="The teachers' Serve config (deployments/...): the plan's base.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a job value (repeatable).")
@click.option("--teacher-throughput", multiple=True, metavar="NAME=CROPS_PER_S",
              help="One replica's throughput for a teacher deployment, measured elsewhere (repeatable); the others "
                   "come from --rates, the shipped table (GPU jobs), args.emulate, or are timed here.")
@click.option("--student-throughput", type=float, default=None,
              help="One train worker's hard-label img/s, measured elsewhere (default: --rates, the shipped table for "
                   "a GPU job, else timed here).")
@click.option("--rates", "rates_file", default=None, metavar="FILE",
              help="Rates measured on a GPU by bench/gpu_check.py (JSON): used before the shipped table.")
@click.option("--time-here", is_flag=True,
              help="GPU job: time what the command line and --rates do not give on this machine's GPU instead of "
                   "taking the shipped table (timm's published benchmarks).")
@click.option("--train-images", type=int, default=None, metavar="N",
              help="Training images per epoch, for the bill (default: data.train_subset or Fashion-MNIST's 60000; "
                   "ImageNet-1k: 1281167).")
@click.option("--passes", type=int, default=1, show_default=True,
              help="Passes of crops the bill's cache way relabels (1: relabel once and replay; the bill says up to "
                   "how many passes the cache still costs less than serving).")
@click.option("--served-ceiling", type=float, default=1.0, show_default=True, metavar="RATIO",
              help="The students' served img/s with teachers that answer at once / their hard-label img/s, measured "
                   "on your student nodes (the served client's own work on their cores; bench/bench_cluster.py "
                   "prints it): the replicas are sized for, and the served way billed at, that pace.")
@click.option("--headroom", type=float, default=1.25, show_default=True,
              help="Teacher capacity / student demand (1.25: replicas at most 80%% busy).")
@click.option("--seconds", type=float, default=3.0, show_default=True, help="How long to time each teacher.")
@click.option("--autoscale", is_flag=True, help="Write autoscaling bounds (planned to 2x) instead of num_replicas.")
@click.option("--output", default=None, help="Planned Serve config (default: <serve-config>-planned.yaml).")
@click.option("--pools", is_flag=True,
              help="A shared cluster's pools: every teacher replica on nodes labelled meal-ray.io/pool=teachers, and "
                   "the job (written to <config>-planned.yaml) on meal-ray.io/pool=students.")
@friendly_errors
def plan(config_path, serve_config, overrides, teacher_throughput, student_throughput, rates_file, time_here,
         train_images, passes, served_ceiling, headroom, seconds, autoscale, output, pools):
    """How many replicas each teacher needs for this job (a table, and a Serve config with them), and the job's bill
    run three ways: the authors' (teachers on every student GPU), served, and relabelled once into a cache."""
    from meal_ray.config import load_config
    from meal_ray.train.plan import plan_job

    cfg = load_config(config_path, list(overrides))
    plan_job(cfg, serve_config, teacher_rates=teacher_throughput, student_rate=student_throughput, headroom=headroom,
             seconds=seconds, output=output, autoscale=autoscale, log=click.echo, pools=pools,
             job_config_path=config_path, rates_file=rates_file, time_here=time_here, train_images=train_images,
             passes=passes, served_ceiling=served_ceiling)


@main.group()
def tracking():
    """MLflow records a run kept while the tracking server was away."""


@tracking.command("sync")
@click.argument("run_dir")
@click.option("--tracking-uri", default=None, help="Where to send them (default: the run's, from its run.json).")
@friendly_errors
def tracking_sync(run_dir, tracking_uri):
    """Send RUN_DIR/mlflow-pending.jsonl (metrics, artifacts, the run's end) to MLflow, in order."""
    from meal_ray.tracking import sync_pending

    sync_pending(run_dir, tracking_uri, log=click.echo)


# --------------------------------------------------------------------------- demo


@main.command()
@click.option("--output", default="runs/demo", show_default=True, help="Demo directory (finished stages are reused).")
@click.option("--quick", is_flag=True, help="Minutes-long run of the whole pipeline on a subset (no gain expected).")
@click.option("--seeds", default="0", show_default=True,
              help="Comma-separated seeds (student init + both arms per seed; the table shows mean ± std), e.g. 0,1,2.")
@click.option("--no-discriminator", is_flag=True, help="Ablation: soft labels only, no discriminator loss.")
@click.option("--weight-decay", default=0.0, show_default=True, help="Ablation: weight decay in both arms.")
@click.option("--hard-label-weight", default=0.0, show_default=True, help="Ablation: add hard-label CE to MEAL V2.")
@click.option("--student-init", type=click.Choice(["pretrained", "random"]), default="pretrained", show_default=True,
              help="Ablation (paper Fig. 6): start both arms from the hard-label init or from random weights.")
@click.option("--cutmix/--no-cutmix", default=None,
              help="Ablation: CutMix in both arms on or off (default: the preset's; the full demo uses CutMix).")
@click.option("--cache-passes", default=0, show_default=True,
              help="Add a third arm: MEAL V2 from a soft-label cache of this many passes, relabelled once per seed "
                   "with the same teachers (0: no cache arm).")
@click.option("--cache-top-k", default=None, type=int,
              help="Ablation: the cache arm trains on only the k largest teacher probabilities per crop, the rest "
                   "spread evenly as FKD does (teachers.cache_top_k; default: all classes); in ablation-top<k>/.")
@click.option("--authors-d-lr", is_flag=True,
              help="Ablation: MEAL V2's discriminator on the student's lr schedule, as the authors' code does "
                   "(MEAL-V2 issue #9), instead of a constant optim.d_lr.")
@click.option("--served-arm/--no-served-arm", default=True, show_default=True,
              help="MEAL V2 from the served teachers. --no-served-arm with --cache-passes runs MEAL V2 from the cache "
                   "alone (no teachers served, ~2.7x cheaper on CPU: the way to ablation rows); in "
                   "ablation<flags>-cache-only/.")
@click.option("--arm-epochs", type=int, default=None,
              help="Patient distillation: both arms (control and MEAL V2, same init) train this many epochs instead of "
                   "the preset's (full: 40); stages and report tagged -e<N>. Pair it with --cache-passes N.")
@click.option("--teachers", default=None,
              help="Comma-separated timm names replacing the preset's teacher ensemble (full: resnet18,resnet10t), "
                   "e.g. resnet18,resnet10t,regnety_004 for a third teacher; the MEAL V2 arms and their cache are "
                   "tagged -teachers-<a>+<b>..., the control and init are shared with the default run.")
@click.option("--teacher-epochs", type=int, default=None,
              help="A stronger ensemble: train the teachers this many epochs instead of the preset's (full: 5), as "
                   "stages teacher-<arch>-e<N> beside the preset's; the MEAL V2 arms and their cache are tagged "
                   "-teachers-e<N>, the control and init are shared with the default run.")
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI (default: sqlite mlflow.db in the working dir).")
@click.option("--address", default=None, help="Ray cluster address (default: embedded local Ray).")
@verbose_option
@friendly_errors
def demo(output, quick, seeds, no_discriminator, weight_decay, hard_label_weight, student_init, cutmix, cache_passes,
         cache_top_k, authors_d_lr, served_arm, arm_epochs, teachers, teacher_epochs, tracking_uri, address):
    """Reproduce MEAL V2's claims on Fashion-MNIST: teachers, student init, control vs MEAL V2, table + plots."""
    from meal_ray.demo import run_demo

    run_demo(output, quick=quick, seeds=_seed_list(seeds), no_discriminator=no_discriminator, weight_decay=weight_decay,
             hard_label_weight=hard_label_weight, student_init=student_init, cutmix=cutmix,
             tracking_uri=tracking_uri, address=address, cache_passes=cache_passes,
             cache_top_k=cache_top_k, authors_d_lr=authors_d_lr, served_arm=served_arm, arm_epochs=arm_epochs,
             teachers=None if teachers is None else teachers.split(","), teacher_epochs=teacher_epochs)


@main.command()
@click.option("--output", default="runs/demo", show_default=True,
              help="The demo directory (the --output the demo and its ablations wrote into).")
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI (default: sqlite mlflow.db in the working dir).")
@friendly_errors
def ablations(output, tracking_uri):
    """One table of the paper's claims: every finished demo ablation under --output against MEAL V2, paired by seed
    (ablations.md, ablations.json, ablations.png there, and an MLflow run)."""
    from meal_ray.demo.ablations import write_ablations

    write_ablations(output, tracking_uri, log=click.echo)


def _seed_list(text: str) -> list:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2",
                                 param_hint="--seeds")


# --------------------------------------------------------------------------- teachers (Ray Serve)


@main.group()
def teachers():
    """The teacher ensemble as a Ray Serve application: up, status, down."""


@teachers.command("up")
@click.option("--config", "config_path", required=True,
              help="Ray Serve config file (`serve deploy` schema), e.g. deployments/fashion-mnist.yaml.")
@click.option("--address", default=None,
              help="Ray cluster to deploy on (default: RAY_ADDRESS, else embedded local Ray that lives until Ctrl-C).")
@click.option("--num-cpus", type=float, default=None,
              help="Embedded Ray only: logical CPUs (default: cores + what the config's replicas ask for).")
@click.option("--block/--no-block", default=None,
              help="Keep running and print status changes (default: yes with embedded Ray, no with --address).")
@friendly_errors
def teachers_up_cmd(config_path, address, num_cpus, block):
    """Deploy the teacher application(s) of a Serve config and wait until they are RUNNING."""
    from meal_ray.serve.lifecycle import teachers_up

    teachers_up(config_path, address=address, block=block, num_cpus=num_cpus, log=click.echo)


@teachers.command("status")
@click.option("--address", default=None, help="Ray cluster (default: RAY_ADDRESS, else the local cluster).")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@friendly_errors
def teachers_status_cmd(address, as_json):
    """Show the Serve applications, their deployments and replicas."""
    from meal_ray.serve.lifecycle import format_status, teachers_status

    status = teachers_status(address, batching=True)
    click.echo(json.dumps(status, indent=2) if as_json else format_status(status))


@teachers.command("down")
@click.option("--config", "config_path", default=None, help="Delete every application of this Serve config file.")
@click.option("--app", "app_name", default=DEFAULT_APP_NAME, show_default=True, help="Application to delete.")
@click.option("--address", default=None, help="Ray cluster (default: RAY_ADDRESS, else the local cluster).")
@friendly_errors
def teachers_down_cmd(config_path, app_name, address):
    """Delete the teacher application(s) (an embedded `teachers up` then exits)."""
    from meal_ray.serve.lifecycle import teachers_down

    deleted = teachers_down(config_path or app_name, address=address)
    click.echo(f"Deleted {', '.join(deleted)}." if deleted
               else f"Nothing to delete: {config_path or app_name} is not deployed.")


if __name__ == "__main__":
    sys.exit(main())
