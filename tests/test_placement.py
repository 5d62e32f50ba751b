"""Placement in Ray's words, checked before anything starts (no Ray here: nodes are described, as Ray lists them).

The cluster-side behaviour (what Ray does with these selectors, and the error before training on a real
multi-node cluster) is in test_cluster.py.
"""

from __future__ import annotations

import pytest
import yaml
from conftest import FMNIST_DATA

from meal_ray.config import load_config
from meal_ray.errors import ConfigError
from meal_ray.placement import (
    POOL_LABEL,
    NodeOffer,
    matches,
    selector_problem,
    serve_demands,
    unplaceable,
    worker_demand,
)

TEACHERS = {POOL_LABEL: "teachers"}
STUDENTS = {POOL_LABEL: "students"}


def cluster(*nodes) -> list:
    return [NodeOffer(f"node{i}", dict(resources), dict(labels)) for i, (resources, labels) in enumerate(nodes)]


def run_config(**run):
    return load_config(data=dict(data=FMNIST_DATA, student={"model": "test_resnet", "num_classes": 10},
                                 teachers={"source": "local", "models": ["test_resnet"]},
                                 optim={"batch_size": 120}, run=run)).run


def test_selectors_follow_rays_syntax_and_meaning():
    assert selector_problem({POOL_LABEL: "students"}) is None
    assert selector_problem({"pool": "!teachers", "ray.io/accelerator-type": "in(A100, H100)"}) is None
    for bad, says in (({"pool": 1}, "label selector value 1"), ({"-pool": "a"}, "label key '-pool'"),
                      ({"bad prefix/pool": "a"}, "prefix before '/'"), ({"pool": "in()"}, "in(a, b)"),
                      ("students", "mapping of label key")):
        assert says in selector_problem(bad)
    labels = {POOL_LABEL: "students", "zone": "a"}
    assert matches({POOL_LABEL: "students"}, labels) and matches({}, labels)
    assert not matches({POOL_LABEL: "teachers"}, labels)
    assert matches({POOL_LABEL: "!teachers"}, labels) and matches({"gpu": "!A100"}, labels)  # missing label: not A100
    assert matches({"zone": "in(a, b)"}, labels) and not matches({"zone": "!in(a,b)"}, labels)
    assert not matches({"gpu": "A100"}, labels)


def test_job_placement_keys_are_rays_scaling_config_and_refused_by_name():
    run = run_config(num_workers=2, cpus_per_worker=3, resources_per_worker={"memory": 2e9, "student_slot": 1},
                     label_selector=STUDENTS)
    assert run.worker_resources() == {"CPU": 3.0, "memory": 2e9, "student_slot": 1.0}
    gpu = run_config(use_gpu=True, resources_per_worker={"CPU": 8}, accelerator_type="A100")
    assert gpu.worker_resources() == {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A100": 0.001}
    for run, says in (
            (dict(label_selector={"pool": 1}), "run.label_selector"),
            (dict(resources_per_worker={"gpu": 1}), "case-sensitive, write GPU"),
            (dict(resources_per_worker={"GPU": 1}), "set run.use_gpu: true"),
            (dict(use_gpu=True, resources_per_worker={"GPU": 0}), "drop GPU"),
            (dict(accelerator_type="A100"), "set run.use_gpu: true too"),
            (dict(use_gpu=True, accelerator_type="A 100"), "Ray's accelerator name"),
            (dict(cpus_per_worker=8, resources_per_worker={"CPU": 4}), "disagree"),
            (dict(resources_per_worker={"memory": -1}), ">= 0"),
            (dict(placement_timeout_s=0), "run.placement_timeout_s"),
            (dict(label_selector="students"), "must be a mapping")):
        with pytest.raises(ConfigError, match=says):
            run_config(**run)


def test_what_is_missing_is_named_label_resource_or_node_count():
    nodes = cluster(({"CPU": 4}, {}), ({"CPU": 4, "GPU": 1}, TEACHERS), ({"CPU": 4, "GPU": 1}, TEACHERS),
                    ({"CPU": 4}, STUDENTS))
    workers = lambda **run: worker_demand(run_config(**run))  # noqa: E731
    assert unplaceable([workers(num_workers=4, label_selector=STUDENTS)], nodes) == []
    no_pool = unplaceable([workers(label_selector={POOL_LABEL: "gpu-students"})], nodes)
    assert len(no_pool) == 1 and "no node has the labels meal-ray.io/pool=gpu-students" in no_pool[0]
    assert "meal-ray.io/pool=students; meal-ray.io/pool=teachers; no labels" in no_pool[0]
    no_gpu = unplaceable([workers(use_gpu=True, label_selector=STUDENTS)], nodes)
    assert "needs GPU 1" in no_gpu[0] and "none offers it" in no_gpu[0]
    too_big = unplaceable([workers(cpus_per_worker=6)], nodes)
    assert "needs CPU 6" in too_big[0] and "the most one offers is 4" in too_big[0]
    custom = unplaceable([workers(resources_per_worker={"student_slot": 1})], nodes)
    assert "needs student_slot 1" in custom[0]
    too_many = unplaceable([workers(num_workers=5, label_selector=STUDENTS)], nodes)
    assert "5 x train worker" in too_many[0] and "4 fit" in too_many[0] and "on 1 such node(s)" in too_many[0]


def test_serve_configs_replicas_count_with_the_jobs_workers_on_shared_nodes():
    app = yaml.safe_load(open("deployments/imagenet-224.yaml"))["applications"][0]
    low, high = serve_demands(app), serve_demands(app, at_most=True)
    assert [(d.what, d.count) for d in low] == [("replica of teacher deployment 'senet154'", 1),
                                                ("replica of teacher deployment 'resnet152s'", 1),
                                                ("replica of the ensemble ingress", 1)]
    assert [d.count for d in high] == [4, 2, 1]
    assert all(d.label_selector == TEACHERS for d in low)
    assert low[0].resources == {"CPU": 4.0, "GPU": 1.0}
    gpu_node = ({"CPU": 16, "GPU": 2}, TEACHERS)
    assert unplaceable(low, cluster(gpu_node)) == []  # 2 GPU replicas + the ingress on one 2-GPU teacher node
    problems = unplaceable(high, cluster(gpu_node, gpu_node))  # 6 GPU replicas, 4 GPUs
    assert "4 x replica of teacher deployment 'senet154'" in problems[0] or "2 x replica" in problems[0]
    # one unlabelled node holding everything: the teachers must not land there
    assert "no node has the labels meal-ray.io/pool=teachers" in unplaceable(low, cluster(({"CPU": 64, "GPU": 8},
                                                                                             {})))[0]


def test_the_autoscaler_lookup_is_where_meal_ray_reads_it():
    """cluster.autoscaler_node_types reads Ray's private GCS record of the autoscaler's node types (as Ray Data does);
    it degrades to "no autoscaler" if Ray moves it. This fails loudly when it moves, so the shim gets fixed."""
    from ray._private import state

    assert callable(state.state.get_cluster_config)
    from ray.core.generated import autoscaler_pb2

    assert {"resources", "max_count", "name"} <= {f.name for f in autoscaler_pb2.NodeGroupConfig.DESCRIPTOR.fields}
    from ray.serve.context import _get_global_client

    assert callable(_get_global_client)


def kuberay_nodes(group: dict, at_most: bool = True) -> list:
    """A KubeRay group's pods as Ray nodes: its Ray resources (the group's `resources`, else its container's limits)
    and its labels, `maxReplicas` of them (or `replicas`)."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    resources = {k: float(v) for k, v in (group.get("resources") or {}).items()}
    resources.setdefault("CPU", float(limits["cpu"]))
    if "nvidia.com/gpu" in limits:
        resources.setdefault("GPU", float(limits["nvidia.com/gpu"]))
    count = group.get("maxReplicas", group.get("replicas", 1)) if at_most else group.get("replicas", 1)
    return [NodeOffer(f"{group.get('groupName', 'head')}-{i}", resources, dict(group.get("labels") or {}))
            for i in range(count)]


def test_kuberay_groups_hold_what_the_serve_config_and_the_job_ask_for():
    """deployments/kuberay: the RayCluster's teacher group holds every teacher replica the 224 px Serve config may
    autoscale to and none of the student workers; its student group holds the job's 8 workers and no teacher; the
    RayJob selects that cluster and submits that job."""
    cluster_cr = yaml.safe_load(open("deployments/kuberay/raycluster.yaml"))
    job_cr = yaml.safe_load(open("deployments/kuberay/rayjob.yaml"))
    assert cluster_cr["kind"] == "RayCluster" and job_cr["kind"] == "RayJob"
    assert job_cr["spec"]["clusterSelector"]["ray.io/cluster"] == cluster_cr["metadata"]["name"]
    groups = {g["groupName"]: g for g in cluster_cr["spec"]["workerGroupSpecs"]}
    head = dict(cluster_cr["spec"]["headGroupSpec"], groupName="head")
    entry = job_cr["spec"]["entrypoint"].split()
    assert entry[:2] == ["meal-ray", "distill"]
    config = entry[entry.index("--config") + 1].replace("/home/ray/meal-ray/", "")
    overrides = [entry[i + 1] for i, word in enumerate(entry) if word == "--set"]
    job = load_config(config, overrides)
    app = yaml.safe_load(open("deployments/imagenet-224.yaml"))["applications"][0]
    assert job.teachers.app_name == app["name"]

    teachers, students = kuberay_nodes(groups["teachers"]), kuberay_nodes(groups["students"])
    head_node = kuberay_nodes(head, at_most=False)
    assert unplaceable(serve_demands(app, at_most=True), teachers + head_node) == []  # autoscaled to the max
    assert unplaceable([worker_demand(job.run)], students) == []
    everything = serve_demands(app, at_most=True) + [worker_demand(job.run)]
    assert unplaceable(everything, teachers + students + head_node) == []
    # the pools do not mix: no teacher replica fits on a student pod, no train worker on a teacher pod or the head
    assert all("no node has the labels meal-ray.io/pool=teachers" in p
               for p in unplaceable(serve_demands(app), students + head_node))
    assert "no node has the labels meal-ray.io/pool=students" in unplaceable([worker_demand(job.run)],
                                                                           teachers + head_node)[0]
    assert head_node[0].resources["CPU"] == 0  # the head runs no training and no teacher
