"""Shared fixtures: one multi-node Ray cluster per test session, tiny exported teachers, Fashion-MNIST configs."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from meal_ray.config import load_config

torch.set_num_threads(2)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

BIN = os.path.dirname(sys.executable)
FMNIST_DATA = dict(dataset="fashion-mnist", image_size=28, crop_scale=[0.5, 1.0], crop_pct=1.0,
                   mean=[0.2860], std=[0.3530])
FMNIST_DATA_CONFIG = dict(input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,), interpolation="bilinear",
                          crop_pct=1.0)


def make_config(mode, model, epochs, lr, subset, teachers=None, **extra):
    return load_config(data=dict(
        name="t", mode=mode, data=dict(FMNIST_DATA, train_subset=subset, val_subset=2000),
        student=dict(model=model, num_classes=10, **extra.pop("student", {})),
        teachers=dict(source="local" if teachers else "none", models=teachers or []),
        optim=dict(epochs=epochs, batch_size=64, lr=lr, lr_milestones=[1000], **extra.pop("optim", {})),
        run=dict(log_every=0, seed=extra.pop("seed", 0)), **extra))


def local_distill_job(name: str, teachers: list, epochs: int, train_subset: int, val_subset: int,
                      experiment: str) -> dict:
    """A small distill job (test_efficientnet from in-process ``teachers``, one 1-CPU worker) as a job YAML holds it."""
    return dict(name=name, mode="distill", data=dict(FMNIST_DATA, train_subset=train_subset, val_subset=val_subset),
                student=dict(model="test_efficientnet", num_classes=10),
                teachers=dict(source="local", models=[{"model": t["model"], "weights": t["weights"]}
                                                      for t in teachers]),
                optim=dict(epochs=epochs, batch_size=128, lr=0.05),
                run=dict(num_workers=1, cpus_per_worker=1, log_every=0, experiment=experiment))


@pytest.fixture(scope="session")
def trained_teachers(tmp_path_factory):
    """Two real teachers trained here with hard labels (in-process engine, a few epochs)."""
    from meal_ray.engine import Engine, student_data_config
    from meal_ray.models import export_model

    root = tmp_path_factory.mktemp("trained_teachers")
    out = []
    for i, arch in enumerate(("resnet10t", "test_resnet")):
        cfg = make_config("pretrain", arch, epochs=3, lr=0.05, subset=6000, seed=i)
        engine = Engine.for_job(cfg, log=lambda s: None)
        result = engine.fit()
        out.append({"model": arch,
                    "weights": str(export_model(engine.student_raw, root / arch, student_data_config(cfg))),
                    "top1": result.top1})
    return out


class SessionCluster:
    """The session's Ray cluster: several Ray nodes on this machine (Ray's own ``ray.cluster_utils.Cluster``), shaped
    like the shared cluster meal-ray is for. A head (GCS, Serve controller, dashboard, job drivers; unlabelled CPUs
    for tests that do not place anything), two teacher nodes and a student node, each labelled with its pool
    (``meal-ray.io/pool``). Every node process starts in ``home`` (relative paths in Serve configs resolve there) and
    unpacks runtime environments (a job's working dir) in a folder of its own: nodes sharing one would unpack over the
    folder a running job's driver works in."""

    POOLS = {"teachers": 2, "students": 1}
    CPUS = {"head": 4, "teachers": 4, "students": 4}  # logical CPUs: more than the cores, so apps and jobs fit

    def __init__(self, home):
        from ray.cluster_utils import Cluster

        self.home = home
        self.added = 0
        with self._in_home():
            self.cluster = Cluster(initialize_head=True, head_node_args=dict(
                num_cpus=self.CPUS["head"], include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=0,
                # its dashboard agent on a free port too (as Cluster gives the other nodes'), not Ray's fixed 52365:
                # a Ray already running on this machine (a demo) holds that one, and jobs then find "no agent"
                dashboard_agent_listen_port=None, runtime_env_dir_name="runtime_resources_head"))
        self.nodes = {pool: [] for pool in self.POOLS}
        for pool, count in self.POOLS.items():
            for _ in range(count):
                self.add_node(pool)

    @contextlib.contextmanager
    def _in_home(self):
        cwd = os.getcwd()
        os.chdir(self.home)
        try:
            yield
        finally:
            os.chdir(cwd)

    def add_node(self, pool: str):
        """A new node of ``pool`` (its labels and CPUs), e.g. the replacement of a lost one."""
        from meal_ray.placement import POOL_LABEL

        self.added += 1
        with self._in_home():  # each node unpacks jobs' working dirs in a folder of its own, as separate machines do
            node = self.cluster.add_node(num_cpus=self.CPUS[pool], labels={POOL_LABEL: pool},
                                         runtime_env_dir_name=f"runtime_resources_{pool}{self.added}")
        self.nodes[pool].append(node)
        return node

    def remove_node(self, node) -> None:
        """Lose ``node`` as a crashed machine is lost: every process on it killed at once."""
        for pool in self.nodes.values():
            if node in pool:
                pool.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def dashboard(self) -> str:
        return f"http://{self.cluster.webui_url}"

    def pool_of(self) -> dict:
        """node id -> pool of every live node (head: "head")."""
        import ray

        from meal_ray.placement import POOL_LABEL

        return {n["NodeID"]: (n.get("Labels") or {}).get(POOL_LABEL, "head") for n in ray.nodes() if n["Alive"]}

    def actor_pools(self, class_prefix: str) -> list:
        """The pool of each live actor whose class name starts with ``class_prefix`` (``RayTrainWorker``,
        ``ServeReplica:<app>:<deployment>``), from Ray's own state (the State API: actor -> node)."""
        from ray.util.state import list_actors

        pools = self.pool_of()
        return [pools.get(a.node_id, "gone") for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000,
                                                                   detail=True)
                if a.class_name.startswith(class_prefix)]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """The session's multi-node Ray cluster (see SessionCluster), with this process connected as a driver."""
    import ray

    os.environ["PATH"] = f"{BIN}:{os.environ.get('PATH', '')}"  # jobs' entrypoints find `meal-ray` on the nodes
    os.environ.pop("RAY_ADDRESS", None)
    # token authentication, as `ray start` turns it on (Ray 2.60): every node, driver and CLI of the session sends
    # ~/.ray/auth_token (`ray get-auth-token --generate` makes it on a fresh machine)
    subprocess.run([f"{BIN}/ray", "get-auth-token", "--generate"], check=True, capture_output=True)
    os.environ.pop("RAY_AUTH_MODE", None)
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    assert maybe_enable_token_auth_if_token_available(warn_if_disabled=False)  # sets RAY_AUTH_MODE=token here too
    test_cluster = SessionCluster(tmp_path_factory.mktemp("cluster-home"))
    # the tests' State API calls (list_actors) ask this cluster, not whichever Ray on this machine Ray's address
    # discovery finds (a demo running beside the tests, another test session's cluster)
    os.environ["RAY_API_SERVER_ADDRESS"] = test_cluster.dashboard
    ray.init(address=test_cluster.address, log_to_driver=True,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
    from meal_ray.cluster import start_serve_without_http

    start_serve_without_http()  # as meal-ray does: the tests' serve.run() calls then open no HTTP port either
    yield test_cluster
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
    test_cluster.cluster.shutdown()


@pytest.fixture(scope="session")
def ray_cluster(cluster):
    """Ray, connected to the session's cluster (for tests that do not care where things run)."""
    import ray

    return ray


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory):
    """Two exported random-init teachers with *different* input sizes (28 and 36) for Fashion-MNIST crops."""
    from meal_ray.models import create_model, export_model

    root = tmp_path_factory.mktemp("teachers")
    out = []
    for i, (arch, size) in enumerate((("test_resnet", 28), ("resnet10t", 36))):
        torch.manual_seed(100 + i)
        dc = dict(FMNIST_DATA_CONFIG, input_size=(1, size, size))
        model = create_model(arch, num_classes=10, in_chans=1, data_config=dc)
        out.append({"model": arch, "weights": str(export_model(model.eval(), root / f"t{i}", dc))})
    return out


def write_fashion_mnist_folder(root, folders, per_class_train, per_class_val):
    """An ImageNet-layout folder (train/<class>/, val/<class>/) of real Fashion-MNIST items named by ``folders``
    (one per label): PNG and JPEG alternate, every third item is stored as RGB."""
    from PIL import Image

    from meal_ray.data import FashionMNIST

    for split, data, per_class in (("train", FashionMNIST(train=True), per_class_train),
                                   ("val", FashionMNIST(train=False), per_class_val)):
        taken = {c: 0 for c in range(10)}
        for i, (image, label) in enumerate(zip(data.images[:3000], data.targets[:3000].tolist())):
            if taken[label] == per_class:
                continue
            taken[label] += 1
            folder = root / split / folders[label]
            folder.mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(image[0].numpy(), mode="L")
            if i % 3 == 0:
                im = im.convert("RGB")
            if i % 2:
                im.save(folder / f"{i}.jpg", quality=95)
            else:
                im.save(folder / f"{i}.png")
        assert all(n == per_class for n in taken.values())
    return root


def recorded_batch(dataset, n: int, size: int = 28, scale: tuple = (0.3, 1.0), seed: int = 0, mixed: bool = False):
    """A training batch of ``size`` px random crops of real samples that records their ids, crop boxes and, if
    ``mixed``, CutMix (what crop-box requests send)."""
    from meal_ray.data import Batch
    from meal_ray.data.batch import cutmix, render_batch
    from meal_ray.data.crops import RandomCropSampler

    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(len(dataset), generator=g)[:n]
    torch.manual_seed(seed)
    sampler = RandomCropSampler(tuple(scale))
    crops = torch.stack([sampler.sample(dataset[int(i)][0]).as_tensor() for i in ids])
    batch = Batch(render_batch(dataset, ids, crops, size), dataset.targets[ids], ids, crops)
    return cutmix(batch, generator=g) if mixed else batch


def json_line(output: str) -> dict:
    """The last JSON object printed by a `--json` command. Run in this process with CliRunner, its output also holds
    the lines Ray's log monitor forwards from the cluster's actors (this process is a Ray driver)."""
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])
