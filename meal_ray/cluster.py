"""Finding or starting Ray, token auth, and every private-Ray call behind one small shim.

Ray 2.60 has no public API for three things meal-ray needs; each is wrapped here, tried, and
degrades to Ray's default behaviour on another Ray version:

- :func:`deploy_serve_config`: deploy a Serve config the way ``serve deploy`` / ``serve run
  config.yaml`` do (``ray.serve._private.api``), keeping applications deployed from other files;
- :func:`quiet_train_reports`: Ray Train V2 logs every ``report()`` with its whole metrics dict
  (``ray.train.v2._internal``);
- :func:`_token_auth_for`: send this machine's auth token to an explicit address
  (``ray._private.authentication``);
- :func:`serve_details`: the deployed Serve applications as the controller knows them (each deployment's applied
  config, each replica's node), what the dashboard's Serve REST API shows (``ray.serve.context``'s controller
  client);
- :func:`autoscaler_node_types`: the node types an autoscaler may add (``ray._private.state``), as Ray Data reads
  them.

It also holds the placement check every command runs before it starts actors (:func:`check_placement`).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from meal_ray.errors import HOW_TO_START, MealRayError, PlacementError, TeachersNotRunningError
from meal_ray.placement import Demand, NodeOffer, fits_somewhere, unplaceable

#: Every private Ray name meal-ray uses ("module:attribute.path") with the keyword arguments it passes.
#: tests/test_ray_private_apis.py resolves each one, so a Ray upgrade that moves or renames one fails that test
#: loudly, where the wrappers below would only degrade to Ray's default behaviour.
PRIVATE_RAY_APIS = {
    "ray._private.authentication.authentication_token_setup:maybe_enable_token_auth_if_token_available":
        ("warn_if_disabled",),
    "ray.train.v2._internal.execution.context:__file__": (),
    "ray.serve._private.api:serve_start": ("http_options", "proxy_location", "grpc_options"),
    "ray.serve._private.client:ServeControllerClient.deploy_apps": ("config",),
    "ray.serve._private.client:ServeControllerClient.get_serve_details": (),
    "ray._private.state:state.get_cluster_config": (),
    "ray.serve.context:_get_global_client": ("raise_if_no_controller_running",),
}

VERBOSE_ENV = "MEAL_RAY_VERBOSE"  # set by --verbose: Ray's own output (its workers' logs, startup lines) shown


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, start_local: bool = True,
               log_to_driver: Optional[bool] = None) -> None:
    """Connect to a cluster (``address``, else RAY_ADDRESS), else start an embedded local Ray.

    With ``start_local=False`` it only connects (``auto`` finds a cluster on this machine).
    Inside `ray job submit` RAY_ADDRESS points at the job's cluster, so jobs join it. Unless ``--verbose``
    (:func:`verbose`), the actors' output is not forwarded here (it stays in Ray's log files): the user sees meal-ray's
    progress lines, not Ray's startup noise.
    """
    import ray

    if ray.is_initialized():
        return
    log_to_driver = verbose() if log_to_driver is None else log_to_driver
    level = logging.INFO if verbose() else logging.WARNING
    if not verbose():
        quiet_startup()
    address = address or os.environ.get("RAY_ADDRESS") or (None if start_local else "auto")
    if address:
        _token_auth_for(address)
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=level)
    else:
        # "local": always a new embedded instance; a bare init() would join the cluster named in Ray's record of the
        # last `ray start`, which outlives a killed `ray start --block` and then refuses num_cpus
        ray.init(address="local", num_cpus=num_cpus, log_to_driver=log_to_driver, logging_level=level,
                 dashboard_port=_own_state_api())


def _own_state_api() -> int:
    """A free port for the embedded instance's dashboard, named in ``RAY_API_SERVER_ADDRESS`` before Ray starts so
    that every process of the instance inherits it. Without it Ray's state API, asked with no address, answers from
    the cluster started last on this machine (Ray's record of it in /tmp/ray): once another Ray starts beside a run
    (a second run, a test suite), Ray Train's placement-group cleaner asks that other cluster whether this run's
    controller is alive, is told it does not exist, and removes the run's workers (measured with Ray 2.60: one lost
    worker group per stage, retried from the last checkpoint). A user's own RAY_API_SERVER_ADDRESS is kept; one this
    function set for an earlier embedded instance of this process is replaced."""
    import socket

    global _embedded_api
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if os.environ.get(STATE_API_VARIABLE) in (None, _embedded_api):
        _embedded_api = os.environ[STATE_API_VARIABLE] = f"http://127.0.0.1:{port}"
    return port


STATE_API_VARIABLE = "RAY_API_SERVER_ADDRESS"
_embedded_api: Optional[str] = None  # the value _own_state_api set, if any


def start_serve_without_http() -> None:
    """Start Ray Serve with no HTTP proxy (``proxy_location: Disabled``, as in the repo's Serve configs): meal-ray calls
    the teachers through deployment handles, so no port is opened that nothing uses. A Serve already running on the
    cluster is used as it is (with the proxies its own config asked for)."""
    from ray import serve

    serve.start(proxy_location="Disabled")


def quiet_startup() -> None:
    """Hide what every start prints and no user acts on: Ray's notice that token auth is on (its default since 2.60)
    and MLflow's creation of a new sqlite store's tables. ``--verbose`` keeps them."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_ray_data() -> None:
    """Ray Data's own terminal lines (each dataset's start and finish, its notice that progress bars are off) are
    Ray's output, not meal-ray's: unless ``--verbose`` they go only to its ray-data.log, as Ray's other logs do.
    Call after ``import ray.data``, which sets up Ray Data's logging."""
    if verbose():
        return
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; its file handler is not a StreamHandler
            handler.setLevel(logging.ERROR)


def connect(address: Optional[str] = None) -> None:
    """Connect this process to a running Ray cluster (never starts one); no cluster -> TeachersNotRunningError."""
    try:
        ensure_ray(address, start_local=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or os.environ.get("RAY_ADDRESS") or "auto"
        raise TeachersNotRunningError(f"no Ray cluster found at {where!r} ({str(e).splitlines()[0]}). "
                                      f"{HOW_TO_START}") from None


def _token_auth_for(address: str) -> None:
    """Send this machine's Ray auth token to an explicit address too.

    Ray 2.60 turns token authentication on for new local clusters (token in ~/.ray/auth_token)
    but a client only sends the token to a cluster it found by itself (``auto``); connecting to
    an explicit ``host:port`` of such a cluster then fails with InvalidAuthToken. Do what Ray
    does for ``auto`` (only when RAY_AUTH_MODE is unset and a token exists); clusters without
    authentication accept such clients too.
    """
    if address == "auto" or os.environ.get("RAY_AUTH_MODE") is not None:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except Exception:  # another Ray version: leave it to RAY_AUTH_MODE
        pass


def user_error(exc: BaseException) -> Optional[MealRayError]:
    """The meal-ray error (named problem and fix) inside a Ray failure: a Train worker's or a task's exception as
    Ray wraps it (WorkerGroupError.worker_failures, RayTaskError causes), so the CLI shows the message, not Ray's
    traceback. None when there is none."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MealRayError):
            cause = getattr(e, "cause", None)  # a RayTaskError subclassing the user's error: unwrap to the original
            return cause if isinstance(cause, MealRayError) else e
        todo += list((getattr(e, "worker_failures", None) or {}).values())
        todo += [getattr(e, "cause", None), getattr(e, "controller_failure", None), e.__cause__, e.__context__]
    return None


def quiet_train_reports() -> None:
    """Ray Train 2.60 logs every report() with its whole metrics dict at INFO (logger named by file path)."""
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except Exception:  # another Ray version: keep its logs
        pass


def deploy_serve_config(config, keep_others: bool = True, log=print) -> None:
    """Deploy a validated ``ServeDeploySchema`` as `serve deploy` does (its ``deployments:`` overrides apply).

    A config deploy replaces the cluster's whole set of config-deployed applications; with
    ``keep_others`` the applications deployed earlier from other files are kept.
    """
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(), proxy_location=config.proxy_location,
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()))
    names = {app.name for app in config.applications}
    apps = list(config.applications)
    if keep_others:
        try:
            for name, details in client.get_serve_details().get("applications", {}).items():
                deployed = details.get("deployed_app_config")
                if deployed and name not in names:
                    apps.append(ServeApplicationSchema.model_validate(deployed))
        except Exception as e:  # best effort
            log(f"(could not read the deployed applications: {e})")
    merged = config.model_dump(exclude_unset=True)
    merged["applications"] = [a.model_dump(exclude_unset=True) for a in apps]
    client.deploy_apps(ServeDeploySchema.model_validate(merged))


# --------------------------------------------------------------------------- placement


def cluster_nodes() -> list:
    """The cluster's live nodes as :class:`~meal_ray.placement.NodeOffer` (total logical resources, labels)."""
    import ray

    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        resources = {k: float(v) for k, v in (n.get("Resources") or {}).items() if not k.startswith("node:")}
        out.append(NodeOffer(f"{n.get('NodeManagerAddress', '?')} ({n['NodeID'][:8]})", resources,
                             dict(n.get("Labels") or {})))
    return out


def autoscaler_node_types() -> Optional[list]:
    """The node types an autoscaler may add to this cluster (resources only), or None when it has no autoscaler (the
    autoscaler publishes its config in the GCS; a fixed cluster has none)."""
    try:
        from ray._private import state

        config = state.state.get_cluster_config()
    except Exception:  # another Ray version: treat the cluster as fixed (checked by test_placement)
        return None
    if config is None:
        return None
    return [NodeOffer(group.name or f"node type {i}", {k: float(v) for k, v in group.resources.items()})
            for i, group in enumerate(config.node_group_configs) if group.max_count != 0]


def serve_details() -> dict:
    """``ServeInstanceDetails`` as a dict: per application its ``deployments`` with ``deployment_config`` (the applied
    options: ``ray_actor_options``, ``num_replicas``, ``autoscaling_config``), ``target_num_replicas`` and ``replicas``
    (each with ``node_id``, ``actor_id``, ``pid``, ``state``). Empty when Serve does not run here."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return (client.get_serve_details() or {}) if client is not None else {}


def app_demands(app_name: str) -> list:
    """The replicas a deployed Serve application holds now, as placement demands (empty when it is not deployed)."""
    from meal_ray.placement import actor_resources

    app = serve_details().get("applications", {}).get(app_name) or {}
    out = []
    for name, d in (app.get("deployments") or {}).items():
        options = (d.get("deployment_config") or {}).get("ray_actor_options") or {}
        out.append(Demand(f"replica of teacher deployment {name!r}" if name != "ensemble"
                          else "replica of the ensemble ingress", int(d.get("target_num_replicas") or 0),
                          actor_resources(options), dict(options.get("label_selector") or {}),
                          f"application {app_name!r}, deployment {name!r}: ray_actor_options"))
    return out


def check_placement(demands: list, what: str, fix: str, timeout_s: Optional[float] = None, log=print) -> None:
    """Stop with a PlacementError naming what is missing when the cluster's nodes cannot hold ``demands`` together;
    with an autoscaler that could add nodes for them, say so and go on (Ray then waits, at most ``timeout_s``)."""
    problems = unplaceable(demands, cluster_nodes())
    if not problems:
        return
    types = autoscaler_node_types()
    if types and all(fits_somewhere(d, types) for d in demands):
        limit = f"; the job waits at most {timeout_s:g} s (run.placement_timeout_s)" if timeout_s else ""
        log(f"[meal-ray] warning: the cluster cannot place {what} yet: {'; '.join(problems)}. It has an autoscaler "
            f"whose node types ({', '.join(t.name for t in types)}) could add such nodes{limit}.")
        return
    raise PlacementError(f"the cluster cannot place {what}:\n  - " + "\n  - ".join(problems) + f"\n{fix}")


def placement_timed_out(exc: BaseException) -> bool:
    """Whether a Ray Train failure is its worker group not being placed in time (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S:
    no node left for the workers)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e).__name__ == "WorkerGroupStartupTimeoutError":
            return True
        todo += [getattr(e, "controller_failure", None), getattr(e, "cause", None), e.__cause__, e.__context__]
    return False
