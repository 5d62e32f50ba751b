"""`meal-ray teachers up|status|down`: deploy the teacher application from a Serve config, watch it, delete it."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional

from ray import serve

from meal_ray.cluster import check_placement, cluster_nodes, connect, deploy_serve_config, ensure_ray, serve_details
from meal_ray.errors import ConfigError, TeachersNotRunningError
from meal_ray.placement import POOL_LABEL, TEACHER_POOL, serve_demands
from meal_ray.serve.app import load_serve_config
from meal_ray.serve.protocol import DEFAULT_APP_NAME, HOW_TO_START


def state_name(state) -> str:
    """Serve status enums print as 'ApplicationStatus.RUNNING'; we want 'RUNNING'."""
    return str(getattr(state, "value", state))


def app_status(app_name: str):
    """The application's Serve status object, or None when it (or Serve) is not there: with no Serve controller on
    the cluster, ``serve.status()`` is an empty status (what Ray 2.60's source does), not an error."""
    return serve.status().applications.get(app_name)


def _last_line(message: str) -> str:
    """Serve reports build/constructor failures as a traceback; its last line is the error."""
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _wait_running(app_names: list, timeout_s: float, log=print) -> dict:
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        status = teachers_status()
        states = {n: status.get(n, {}).get("status", "NOT_DEPLOYED") for n in app_names}
        if states != last:
            log("  " + ", ".join(f"{n}: {s}" for n, s in states.items()))
            last = states
        if all(s == "RUNNING" for s in states.values()):
            return status
        failed = {n: status[n] for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed or time.monotonic() > deadline:
            detail = "; ".join(f"{n}: {v['status']}: {_last_line(v['message'])}" for n, v in (failed or {
                n: status.get(n, {"status": states[n], "message": ""}) for n in app_names}).items())
            raise TeachersNotRunningError(
                f"the teacher application did not reach RUNNING{'' if failed else f' within {timeout_s:.0f}s'} "
                f"({detail}). "
                "See `meal-ray teachers status` / `serve status` and the replica logs.")
        time.sleep(1.0)


def teachers_up(config_path: str | Path, address: Optional[str] = None, block: Optional[bool] = None,
                num_cpus: Optional[float] = None, timeout_s: float = 600.0, log=print) -> dict:
    """Deploy the applications of a Serve config file and wait until they are RUNNING.

    Without ``address`` (and no RAY_ADDRESS, and no Ray already initialized in this process)
    Ray is started embedded here; the cluster lives as long as this process, so then
    ``block`` defaults to True: print status until Ctrl-C (or until the apps are deleted with
    ``teachers down``), then shut Serve and Ray down. With a cluster address the apps are
    deployed there and this returns. Uses Ray's own config-deploy path (what `serve run
    config.yaml` does), so the config's ``deployments:`` overrides apply exactly as with `serve deploy`.
    Applications deployed earlier from other config files are kept (`serve deploy` would remove them).
    """
    import ray

    config = load_serve_config(config_path)
    names = [app.name for app in config.applications]
    address = address or os.environ.get("RAY_ADDRESS")
    embedded = False
    if not ray.is_initialized():
        if address:
            connect(address)
        else:
            needed = sum(d.count * d.resources.get("CPU", 0.0) for d in config_demands(config))
            cpus = num_cpus or (os.cpu_count() or 1) + needed  # the machine stays free for training workers
            ensure_ray(None, num_cpus=int(math.ceil(cpus)))  # a new local instance, never a stale cluster's record
            embedded = True
            gcs = ray.get_runtime_context().gcs_address
            log(f"Started embedded Ray ({cpus:g} logical CPUs) at {gcs}; it lives as long as this command.")
            log(f"  train against it with: --address {gcs}   (or RAY_ADDRESS={gcs})")
    block = embedded if block is None else block
    try:
        check_placement(config_demands(config), f"the Serve config {config_path}'s replicas",
                        "Add nodes that offer it (e.g. `ray start --address <head> --num-cpus N "
                        f"--labels {POOL_LABEL}={TEACHER_POOL}` for the teachers), or change the deployments' "
                        "num_replicas / autoscaling_config / ray_actor_options in the Serve config.", log=log)
        status = _deploy(config, names, config_path, timeout_s, log)
    except BaseException:
        if embedded:  # nothing else uses this cluster
            ray.shutdown()
        raise
    if not block:
        return status
    log("Teachers are up. Ctrl-C (or `meal-ray teachers down`) stops them.")
    try:
        while True:
            time.sleep(2.0)  # `teachers down` elsewhere ends this within two seconds
            now = teachers_status()
            if not any(n in now for n in names):
                log("The teacher applications were deleted; shutting down.")
                break
            for n in names:
                if n in now and now[n]["status"] != status.get(n, {}).get("status"):
                    log(format_status({n: now[n]}))
            status = now
    except KeyboardInterrupt:
        log("Stopping the teachers ...")
    finally:
        if embedded:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    return status


def _deploy(config, names: list, config_path, timeout_s: float, log) -> dict:
    """Ray's config-deploy path (what `serve run config.yaml` does), keeping other config-deployed apps."""
    deploy_serve_config(config, keep_others=True, log=log)
    log(f"Deploying {', '.join(names)} from {config_path} ...")
    status = _wait_running(names, timeout_s, log)
    for name in names:
        log(format_status({name: status[name]}))
    return status


def config_demands(config) -> list:
    """The replicas a Serve config's applications ask for (a meal-ray app's deployments it does not list run with the
    code's defaults: one CPU per teacher replica, none for the ingress)."""
    from meal_ray.config import load_app_config
    from meal_ray.serve.app import IMPORT_PATH
    from meal_ray.serve.deployments import INGRESS_NAME

    out = []
    for app in config.applications:
        raw = app.model_dump(exclude_unset=True)
        listed = {d.get("name") for d in raw.get("deployments") or []}
        defaults = []
        if app.import_path == IMPORT_PATH:
            parsed = load_app_config(dict(app.args or {}))
            defaults = [{"name": t.name or f"teacher{i}", "ray_actor_options": {"num_cpus": 1}}
                        for i, t in enumerate(parsed.teachers)]
            defaults.append({"name": INGRESS_NAME, "ray_actor_options": {"num_cpus": 0}})
        deployments = list(raw.get("deployments") or []) + [d for d in defaults if d["name"] not in listed]
        out += serve_demands({"deployments": deployments})
    return out


def teachers_status(address: Optional[str] = None, batching: bool = False) -> dict:
    """``{app: {"status", "message", "deployments": {name: {"status", "message", "replicas", "nodes"}}}}`` of the
    cluster. With ``batching`` (what `meal-ray teachers status` shows; one call per healthy deployment, so not for the
    polling loops) a meal-ray teacher deployment adds ``batching``: one replica's forward passes, crops, largest,
    max_batch_size."""
    connect(address)
    apps = serve.status().applications  # empty when Serve is not running
    out = {}
    where = replica_nodes()
    for name, app in apps.items():
        deployments = {}
        for d, s in app.deployments.items():
            deployments[d] = {"status": state_name(s.status), "message": s.message or "",
                              "replicas": {state_name(k): v for k, v in (s.replica_states or {}).items()},
                              "nodes": where.get((name, d), {})}
            counts = _teacher_batching(name, d) if batching and deployments[d]["status"] == "HEALTHY" else None
            if counts:
                deployments[d]["batching"] = counts
        out[name] = {"status": state_name(app.status), "message": app.message or "", "deployments": deployments}
    return out


def _teacher_batching(app: str, deployment: str, timeout_s: float = 5.0) -> Optional[dict]:
    """One replica's batching counters when the deployment is a meal-ray teacher; None for anything else (the
    ensemble ingress, another project's deployment) or a replica that does not answer within ``timeout_s``."""
    try:
        info = serve.get_deployment_handle(deployment, app_name=app).info.remote().result(timeout_s=timeout_s)
    except Exception:  # no info method, or no answer: status still prints what Serve says
        return None
    if not isinstance(info, dict) or "batching" not in info:
        return None
    return dict(info["batching"], max_batch_size=info.get("max_batch_size"))


def replica_nodes() -> dict:
    """``{(app, deployment): {node: running replicas}}``, each node named by its address and pool labels."""
    names = {}
    for n in cluster_nodes():
        node_id = n.labels.get("ray.io/node-id", "")
        names[node_id] = n.name.split(" ")[0] + (f" [{n.pool}]" if n.pool != "no labels" else "")
    out: dict = {}
    for app, details in (serve_details().get("applications") or {}).items():
        for d, dep in (details.get("deployments") or {}).items():
            counts = out.setdefault((app, d), {})
            for r in dep.get("replicas") or []:
                if state_name(r.get("state")) == "RUNNING":
                    node = names.get(r.get("node_id"), str(r.get("node_id", "?"))[:8])
                    counts[node] = counts.get(node, 0) + 1
    return out


def format_status(status: dict) -> str:
    if not status:
        return f"No Serve applications are running. {HOW_TO_START}"
    lines = []
    for name, app in status.items():
        lines.append(f"{name}: {app['status']}" + (f" ({app['message']})" if app["message"] else ""))
        for d, s in app["deployments"].items():
            replicas = ", ".join(f"{n} {k}" for k, n in s["replicas"].items()) or "no replicas"
            nodes = ", ".join(f"{n} on {node}" for node, n in sorted(s.get("nodes", {}).items()))
            lines.append(f"  {d}: {s['status']} [{replicas}]" + (f" ({nodes})" if nodes else "")
                         + (f" {s['message']}" if s["message"] else "") + _format_batching(s.get("batching")))
    return "\n".join(lines)


def _format_batching(b: Optional[dict]) -> str:
    if not b:
        return ""
    if not b["forward_passes"]:
        return f" | batches: none yet (max_batch_size {b['max_batch_size']})"
    return (f" | batches: mean {b['crops'] / b['forward_passes']:.1f} crops, largest {b['largest']} of "
            f"max_batch_size {b['max_batch_size']}, {b['forward_passes']} forward passes (one replica)")


def teachers_down(target: str | Path = DEFAULT_APP_NAME, address: Optional[str] = None) -> list:
    """Delete the teacher application(s): an app name, or a Serve config file (all its applications)."""
    names = [str(target)]
    p = Path(str(target))
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"Serve config {str(p)!r} does not exist.")
        import yaml

        names = [a.get("name", "default") for a in (yaml.safe_load(p.read_text()) or {}).get("applications", [])]
    from ray.exceptions import RayActorError

    running = teachers_status(address)
    deleted = [n for n in names if n in running]
    for n in deleted:
        try:
            serve.delete(n)
        except RayActorError:
            # the Serve controller went away while this waited for the deletion to finish: an embedded `teachers up`
            # saw its apps gone and shut its Serve and Ray down, apps and all; nothing of them is left to delete
            break
    return deleted
