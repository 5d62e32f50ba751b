"""Where a job's train workers and its teachers' replicas go, and whether the cluster's nodes can hold them.

Placement is said in Ray's own words: Ray Train's ``ScalingConfig`` (``run.resources_per_worker``,
``run.accelerator_type``, ``run.label_selector``) for the student workers, Serve's ``ray_actor_options``
(``num_cpus``, ``num_gpus``, ``resources``, ``accelerator_type``, ``label_selector``) for each teacher deployment.
A shared cluster keeps two pools apart with a node label, by convention ``meal-ray.io/pool``: ``teachers`` on the
nodes that serve the teachers (``ray start --labels meal-ray.io/pool=teachers``), ``students`` on the nodes that
train.

Ray itself never says "this cannot be placed": an actor that no node can hold waits forever (or until an autoscaler
adds a node). :func:`unplaceable` compares what a job and a Serve application ask for with what the nodes offer and
names what is missing (a label, a resource, enough nodes), so the job stops before it starts. Plain Python: the nodes
are handed in (``meal_ray.cluster.cluster_nodes`` reads them from Ray).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

POOL_LABEL = "meal-ray.io/pool"  # the node label that keeps the teacher pool and the student pool apart
TEACHER_POOL, STUDENT_POOL = "teachers", "students"
ACCELERATOR_PREFIX = "accelerator_type:"  # Ray's resource for a node's accelerator type (e.g. accelerator_type:A100)
ACCELERATOR_UNIT = 0.001  # what Ray Train and Serve ask of that resource per worker / replica

# Kubernetes label syntax, which Ray's labels follow: a name of <= 63 characters, alphanumeric at both ends, with
# - _ . inside; a key may carry a DNS-subdomain prefix ("meal-ray.io/pool"). A selector value is a label value,
# optionally negated (!spot) or a set: in(a, b), !in(a, b).
_NAME = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
_PREFIX = rf"{_NAME}(\.{_NAME})*"
_SELECTOR_VALUE = re.compile(rf"^!?(in\(\s*{_NAME}(\s*,\s*{_NAME})*\s*\)|{_NAME})$")


def label_key_problem(key) -> Optional[str]:
    """Why ``key`` is not a Ray node label key, or None."""
    if not isinstance(key, str) or not key:
        return f"label key {key!r} must be a non-empty string"
    prefix, _, name = key.rpartition("/")
    if "/" in key and (len(prefix) > 253 or not re.fullmatch(_PREFIX, prefix)):
        return f"label key {key!r}: the prefix before '/' must be a DNS subdomain, e.g. meal-ray.io/pool"
    if len(name) > 63 or not re.fullmatch(_NAME, name):
        return (f"label key {key!r}: the name must be at most 63 characters, alphanumeric at both ends, with - _ . "
                "inside")
    return None


def selector_problem(selector) -> Optional[str]:
    """Why ``selector`` is not a Ray label selector ({key: value | !value | in(a, b) | !in(a, b)}), or None."""
    if not isinstance(selector, dict):
        return f"a label selector is a mapping of label key to value, e.g. {{{POOL_LABEL}: {STUDENT_POOL}}}"
    for key, value in selector.items():
        problem = label_key_problem(key)
        if problem:
            return problem
        if not isinstance(value, str) or not _SELECTOR_VALUE.match(value.strip()):
            return (f"label selector value {value!r} for {key!r}: use a label value (students), !value, in(a, b) or "
                    "!in(a, b)")
    return None


def _selected(condition: str, value: Optional[str]) -> bool:
    condition = condition.strip()
    negated = condition.startswith("!")
    condition = condition[1:] if negated else condition
    if condition.startswith("in("):
        wanted = {v.strip() for v in condition[3:-1].split(",")}
    else:
        wanted = {condition}
    hit = value in wanted
    return not hit if negated else hit


def matches(selector: Optional[dict], labels: dict) -> bool:
    """Whether a node with ``labels`` satisfies ``selector`` (every key's condition; a missing label matches only
    negated conditions)."""
    return all(_selected(cond, labels.get(key)) for key, cond in (selector or {}).items())


def format_selector(selector: Optional[dict]) -> str:
    return ", ".join(f"{k}={v}" for k, v in (selector or {}).items()) or "no labels"


def format_resources(resources: dict) -> str:
    return ", ".join(f"{k} {_amount(k, v)}" for k, v in sorted(resources.items())) or "nothing"


def _amount(key: str, value: float) -> str:
    if key in ("memory", "object_store_memory"):
        return f"{value / 2 ** 30:.1f} GiB"
    return f"{value:g}"


@dataclass(frozen=True)
class Demand:
    """``count`` units (train workers, replicas of one deployment), each needing ``resources`` on one node whose
    labels satisfy ``label_selector``."""

    what: str  # e.g. "train worker", "replica of teacher deployment 'resnet18'"
    count: int
    resources: dict
    label_selector: dict = field(default_factory=dict)
    where: str = ""  # the config keys that ask for the resources, for the message
    selector_where: str = ""  # the config key that asks for the labels (default: where)


@dataclass(frozen=True)
class NodeOffer:
    """A node as placement sees it: its total logical resources and its labels."""

    name: str
    resources: dict
    labels: dict = field(default_factory=dict)

    @property
    def pool(self) -> str:
        return format_selector({k: v for k, v in self.labels.items() if not k.startswith("ray.io/")})


def worker_demand(run) -> Demand:
    """The job's train workers (``RunConfig``) as Ray Train schedules them."""
    return Demand("train worker", run.num_workers, run.worker_resources(), dict(run.label_selector or {}),
                  "run.cpus_per_worker, run.resources_per_worker, run.use_gpu, run.accelerator_type",
                  "run.label_selector")


def actor_resources(options: Optional[dict], default_cpus: float = 1.0) -> dict:
    """What one actor with Serve's ``ray_actor_options`` asks of its node (Serve's default: 1 CPU)."""
    options = dict(options or {})
    resources = {"CPU": float(options.get("num_cpus", default_cpus) if options.get("num_cpus") is not None
                              else default_cpus)}
    if options.get("num_gpus"):
        resources["GPU"] = float(options["num_gpus"])
    if options.get("memory"):
        resources["memory"] = float(options["memory"])
    resources.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
    if options.get("accelerator_type"):
        resources[ACCELERATOR_PREFIX + options["accelerator_type"]] = ACCELERATOR_UNIT
    return {k: v for k, v in resources.items() if v}


def deployment_replicas(deployment: dict) -> tuple[int, int]:
    """(replicas that must run, replicas it may grow to) of a Serve deployment config dict."""
    auto = deployment.get("autoscaling_config")
    if isinstance(auto, dict) and deployment.get("num_replicas") in (None, "auto"):
        low = int(auto.get("min_replicas", 1) or 0)
        return max(low, int(auto.get("initial_replicas") or low)), int(auto.get("max_replicas", max(low, 1)))
    replicas = deployment.get("num_replicas")
    replicas = 1 if replicas in (None, "auto") else int(replicas)
    return replicas, replicas


def serve_demands(app: dict, at_most: bool = False) -> list:
    """The replicas of a meal-ray Serve application (a dict of the `serve deploy` schema's application, or its
    deployed form): one Demand per deployment, at its running count (``at_most``: its autoscaling maximum)."""
    out = []
    for d in app.get("deployments") or []:
        low, high = deployment_replicas(d)
        count = high if at_most else low
        if count <= 0:
            continue
        options = d.get("ray_actor_options") or {}
        name = d.get("name", "?")
        out.append(Demand(f"replica of teacher deployment {name!r}" if name != "ensemble"
                          else "replica of the ensemble ingress",
                          count, actor_resources(options), dict(options.get("label_selector") or {}),
                          f"the Serve config's deployments[{name}].ray_actor_options"))
    return out


def unplaceable(demands: Iterable[Demand], nodes: Iterable[NodeOffer]) -> list:
    """What keeps ``demands`` from being placed together on ``nodes`` (their total resources), one sentence each;
    empty when they fit. Checks, per demand: a node with the labels; on those, each resource; then packs every unit
    (largest first) onto the nodes to find too few nodes."""
    demands, nodes = [d for d in demands if d.count > 0], list(nodes)
    problems = []
    for d in demands:
        labelled = [n for n in nodes if matches(d.label_selector, n.labels)]
        if not labelled:
            seen = "; ".join(sorted({n.pool for n in nodes})) or "none"
            problems.append(f"no node has the labels {format_selector(d.label_selector)} that each {d.what} asks for "
                            f"({d.selector_where or d.where}); the cluster's {len(nodes)} node(s) carry: {seen}")
            continue
        for key, need in sorted(d.resources.items()):
            best = max(n.resources.get(key, 0.0) for n in labelled)
            if best + 1e-9 < need:
                where = ("" if not d.label_selector else f" with labels {format_selector(d.label_selector)}")
                offered = (f"the most one offers is {_amount(key, best)}" if best > 0 else "none offers it")
                problems.append(f"each {d.what} needs {key} {_amount(key, need)} ({d.where}), but of the nodes{where} "
                                f"{offered}")
    if problems:
        return problems
    free = {n.name: dict(n.resources) for n in nodes}
    units = sorted((i for i, d in enumerate(demands) for _ in range(d.count)),
                   key=lambda i: -sum(demands[i].resources.values()))
    placed = [0] * len(demands)
    for i in units:
        d = demands[i]
        for n in nodes:
            room = free[n.name]
            if matches(d.label_selector, n.labels) and all(room.get(k, 0.0) + 1e-9 >= v
                                                           for k, v in d.resources.items()):
                for k, v in d.resources.items():
                    room[k] = room.get(k, 0.0) - v
                placed[i] += 1
                break
    for d, got in zip(demands, placed):
        if got < d.count:
            labelled = [n for n in nodes if matches(d.label_selector, n.labels)]
            problems.append(
                f"{d.count} x {d.what} ({format_resources(d.resources)} each"
                + (f", on nodes with {format_selector(d.label_selector)}" if d.label_selector else "")
                + f") do not fit: {got} fit beside the rest of what is asked, on {len(labelled)} such node(s) "
                f"offering {'; '.join(format_resources(n.resources) for n in labelled[:4])}"
                + (" ..." if len(labelled) > 4 else "") + f" ({d.where})")
    return problems


def fits_somewhere(demand: Demand, node_types: Iterable[NodeOffer]) -> bool:
    """Whether one unit of ``demand`` fits on some node type an autoscaler could add (resources only: Ray's
    autoscaler config does not say which labels its nodes will carry)."""
    return any(all(t.resources.get(k, 0.0) + 1e-9 >= v for k, v in demand.resources.items()) for t in node_types)


def cpu_threads(resources: dict) -> int:
    """Torch threads for a worker holding ``resources`` (its whole CPUs, at least one)."""
    return max(1, int(math.floor(resources.get("CPU", 1.0))))
