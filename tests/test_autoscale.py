"""A cluster that grows: resources against what it can launch, not only what is up (the fit rule over
live nodes and the autoscaler's node types, fast with the cluster faked), nodes that join after the
storage check, the Jobs address mistaken for the cluster's, and a real autoscaling cluster on loopback
(Ray's fake_multinode provider, tests/cluster/fixture.py) that starts with no worker node."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.ray_backend import adapter
from pipeline.ray_backend import cluster as C
from pipeline.ray_backend.resources import NodeType, Resources
from tests.cluster.fixture import FakeAutoscalingCluster

CLI = str(Path(sys.executable).parent / "iwae-pipeline")
GPU_WORKER = {"resources": {"CPU": 1, "GPU": 1}, "max_workers": 2}


def node(**resources):
    return {"NodeID": "n" * 56, "Alive": True, "Resources": {k.upper(): float(v) for k, v in resources.items()}}


@pytest.fixture
def offers(monkeypatch):
    """A cluster object whose live nodes and launchable node types are faked; records the waits for a launch."""
    waited = []
    cluster = C.Cluster("127.0.0.1:6379", owned=False, capabilities=adapter.probe())

    def set_offers(nodes, types):
        monkeypatch.setattr(cluster, "work_nodes", lambda: nodes)
        cluster._types, cluster._types_read = types, True
        monkeypatch.setattr(cluster, "await_node", lambda res, node_type, notice=None: waited.append((res, node_type)))
        return cluster, waited

    return set_offers


def test_mixed_node_sizes_refuse_a_request_no_single_node_meets(offers):
    """A 2-CPU node and a 1-CPU/1-GPU node: 2 CPU with 1 GPU fits neither, though the cluster has both in total."""
    c, _ = offers([node(cpu=2), node(cpu=1, gpu=1)], [])
    with pytest.raises(
        UserError,
        match=r"asked for 2 CPU and 1 GPU per worker but no node has that \(the largest offers 1 CPU and 1 GPU\); ask for fewer CPUs .*--train-cpus",
    ):
        c.check_resources(Resources(2, 1))
    c.check_resources(Resources(2, 0))
    c.check_resources(Resources(1, 1))


def test_a_request_only_a_launchable_type_meets_waits_for_the_autoscaler(offers):
    """No worker node up, a GPU type the autoscaler can launch: accepted (and waited for); one GPU by default."""
    gpu = NodeType("gpu_worker", {"CPU": 1.0, "GPU": 1.0}, 2)
    c, waited = offers([], [NodeType("cpu_worker", {"CPU": 4.0}, 2), gpu])
    assert c.default_gpus(None) == 1.0 and c.default_gpus(0.25) == 0.25
    c.check_resources(Resources(1, 1))
    assert waited == [(Resources(1, 1), gpu)]
    c.check_resources(Resources(4, 0))
    assert waited[-1][1].name == "cpu_worker"
    with pytest.raises(UserError, match="autoscaler can launch none that has.*largest offers 1 CPU and 1 GPU: node type gpu_worker"):
        c.check_resources(Resources(8, 1))
    c, _ = offers([], [NodeType("cpu_worker", {"CPU": 4.0}, 2)])
    assert c.default_gpus(None) == 0.0
    with pytest.raises(UserError, match="ask for no GPU .*--train-gpus 0"):
        c.check_resources(Resources(1, 1))


def test_the_head_config_gives_the_worker_types():
    """The autoscaler's config on the head, as `ray up` writes it: worker types with a launch limit, the head and empty types left out."""
    config = {
        "head_node_type": "head",
        "max_workers": 8,
        "available_node_types": {
            "head": {"resources": {"CPU": 0}},
            "gpu_worker": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 4},
            "cpu_worker": {"resources": {"CPU": 2}},  # the cluster's max_workers applies
            "off": {"resources": {"CPU": 64}, "max_workers": 0},
        },
    }
    assert adapter.worker_types(config) == [NodeType("gpu_worker", {"CPU": 8.0, "GPU": 1.0}, 4), NodeType("cpu_worker", {"CPU": 2.0}, 8)]
    assert adapter.worker_types({"available_node_types": {}}) == []
    config["available_node_types"]["gpu_worker"].pop("resources")  # left to the cloud provider to fill in: unknown, never "none"
    assert adapter.worker_types(config) is None


def test_this_ray_offers_every_internal_the_backend_uses():
    """The adapter's probe on the installed Ray finds each internal (a Ray upgrade that moves one
    fails here, not silently on a cluster); a probe that misses one says what that costs."""
    caps = adapter.probe()
    assert caps.loopback and caps.cluster_config and caps.head_config and caps.launch_status and caps.line() == "", caps
    gone = adapter.Capabilities(True, False, False, True, ("node types unknown: the GPU default is 0 until a GPU node is up",))
    assert "GPU default is 0" in gone.line()


def test_a_trial_on_a_node_that_cannot_see_the_results_fails_at_once_in_one_line(tmp_path, mnist_dir):
    """A node that joined after the driver's storage check and does not share its folder: the training
    task stops before training, naming the fix."""
    import jobs
    from pipeline.datasource import DataSource
    from pipeline.store.objects import Store
    from pipeline.store.results import Results
    from pipeline.work import train_unit

    driver = Results.open(str(tmp_path / "results"))  # the driver's folder, with its marker
    on_the_node = Results(Store.open(tmp_path / "elsewhere"))  # the same path on a node with its own disk: empty
    run = jobs.build("demo", "smoke", None, None).runs[0]
    with pytest.raises(UserError, match=r"cannot use .*does not see the driver's files there.*--results s3://") as e:
        train_unit(on_the_node, DataSource.open(mnist_dir), [run.to_dict()], "test-token")
    assert "\n" not in str(e.value) and not (tmp_path / "elsewhere" / "runs").exists()
    assert driver.usable_here() == "" and not list((tmp_path / "results").glob("_check/*"))


def test_ray_address_set_to_the_jobs_url_is_refused_in_one_line(tmp_path, mnist_dir):
    """RAY_ADDRESS=http://HEAD:8265, as Ray's job docs say to export: a local sweep says what that address is for, in one line."""
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265"}
    r = subprocess.run(
        [CLI, "sweep", "demo", "--size", "smoke", "--results", tmp_path / "r", "--data-dir", mnist_dir], capture_output=True, text=True, env=env, timeout=120
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert "RAY_ADDRESS=http://127.0.0.1:8265" in lines[0] and "submit" in lines[0] and "HOST:6379" in lines[0] and "unset RAY_ADDRESS" in lines[0]
    assert not (tmp_path / "r").exists()  # the location it created before connecting is undone


# ------------------------------------------------------------------------ a real autoscaling cluster


@pytest.fixture(scope="module")
def autoscaling(tmp_path_factory):
    c = FakeAutoscalingCluster(tmp_path_factory.mktemp("autoscale"), {"gpu_worker": GPU_WORKER})
    yield c
    c.stop()


def cli(cluster, *args, cwd, timeout=600):
    """The CLI as a user runs it against the head: its own process, no Ray settings of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ENABLE", "RAY_FAKE", "IWAE_TEST"))}
    env.update(RAY_AUTH_MODE="disabled")
    return subprocess.run([CLI, *map(str, args), "--address", cluster.address], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


@pytest.mark.slow
def test_an_impossible_request_is_refused_in_one_line(autoscaling, mnist_dir, tmp_path):
    """8 CPUs per trial, which no node and no node type has: exit 2 within a minute, one line naming the largest offer."""
    t0 = time.monotonic()
    r = cli(autoscaling, "sweep", "demo", "--size", "smoke", "--train-cpus", "8", "--results", tmp_path / "r", "--data-dir", mnist_dir, cwd=tmp_path)
    seconds = time.monotonic() - t0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert "8 CPU and 1 GPU" in lines[0] and "1 CPU and 1 GPU: node type gpu_worker" in lines[0], lines[0]
    assert seconds < 60, seconds


@pytest.mark.slow
def test_sweep_on_a_cluster_with_no_worker_node_launches_one(autoscaling, mnist_dir, tmp_path):
    """`sweep demo --address HEAD` with no resource flags: a GPU worker is launched, every run and eval row is written."""
    t0 = time.monotonic()
    r = cli(autoscaling, "sweep", "demo", "--size", "smoke", "--results", tmp_path / "r", "--data-dir", mnist_dir, cwd=tmp_path)
    print(f"autoscaled smoke sweep: {time.monotonic() - t0:.1f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gpu_worker node" in r.stderr and "each training task gets 1 CPU and 1 GPU" in r.stderr, r.stderr[-3000:]
    assert any(n.get("GPU") == 1 for n in autoscaling.worker_nodes())
    runs = pq.read_table(tmp_path / "r" / "tables" / "runs").to_pandas()
    assert len(runs) == 2 and set(runs.status) == {"done"}
    from pipeline.store.estimates import read_estimates

    ev = read_estimates(str(tmp_path / "r"), estimate="k100-seed123-block50")
    assert len(ev) == 2 * 20 and not ev.duplicated(["run_id", "image_id"]).any()
