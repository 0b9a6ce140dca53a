"""Robustness without a cluster: nothing in the results location is unpickled; Ray and store errors in
the executor's loop are one-line reasons; the stall rule; the CPUs the embedded Ray claims."""

import pytest


@pytest.mark.slow
def test_no_pickle_in_the_results_location_is_ever_loaded(tmp_path, mnist_dir):
    """Whoever can write the results location must not run code in the driver: a Tune experiment's
    state (``tune/<exp>/tuner.pkl``, what the sweep once restored from) and pickles beside the
    checkpoints, each of which would write a file when unpickled, are never loaded by a sweep that
    trains, evaluates and reports there."""
    import os
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    results = tmp_path / "r"
    (results / "tune" / "demo-0000").mkdir(parents=True)
    (results / "_iwae-pipeline.json").write_text('{"format": "iwae-pipeline/2"}')
    for key in ("tune/demo-0000/tuner.pkl", "tune/demo-0000/experiment_state.pkl", "runs/767809530607/trial.pkl"):
        (results / key).parent.mkdir(parents=True, exist_ok=True)
        (results / key).write_bytes(pickle.dumps(Evil()))
    cli = str(Path(sys.executable).parent / "iwae-pipeline")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run(
        [cli, "sweep", "demo", "--size", "smoke", "--results", results, "--data-dir", mnist_dir], capture_output=True, text=True, env=env, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert not sentinel.exists()
    pickle.loads((results / "tune/demo-0000/tuner.pkl").read_bytes())  # the power check: loading it would have written the file
    assert sentinel.exists()


class _Source:
    """An executor source whose result write fails as a store blip would, or succeeds."""

    results = None

    def __init__(self, error: Exception | None = None):
        self.error = error

    def done(self, unit, value):
        if self.error is not None:
            raise self.error


def test_every_ray_error_and_a_failed_write_is_a_reason_never_a_traceback(monkeypatch):
    """The executor's outcome of one task: Ray's out-of-memory and runtime-env errors and an OSError
    while writing the result come back as one-line reasons; the OSError is marked transient (the loop
    retries it within --retries); a deterministic error in the work is a reason, a UserError is raised."""
    import ray
    import ray.exceptions as rex

    from pipeline.errors import UserError
    from pipeline.ray_backend import executor

    unit = executor.Unit("run x images 0-0", print, ())

    def raising(error):
        def get(ref):
            raise error

        return get

    for error in (rex.OutOfMemoryError("task was killed: node low on memory"), rex.RuntimeEnvSetupError("pip failed")):
        monkeypatch.setattr(ray, "get", raising(error))
        why = executor.outcome(object(), _Source(), unit, 3)
        assert isinstance(why, str) and type(error).__name__ in why, why
    monkeypatch.setattr(ray, "get", raising(rex.RayTaskError("f", "tb", ValueError("bad shape"))))
    assert executor.outcome(object(), _Source(), unit, 3) == "bad shape"
    monkeypatch.setattr(ray, "get", raising(rex.RayTaskError("f", "tb", UserError("--test-images 20000 exceeds"))))
    with pytest.raises(UserError, match="exceeds"):
        executor.outcome(object(), _Source(), unit, 3)
    monkeypatch.setattr(ray, "get", lambda ref: "table")
    why = executor.outcome(object(), _Source(OSError("connection reset")), unit, 3)
    assert isinstance(why, str) and why.startswith(executor.TRANSIENT) and "connection reset" in why, why
    assert executor.outcome(object(), _Source(), unit, 3) is None


def test_a_cluster_python_without_the_project_or_a_dependency_is_named_in_one_line(capsys, monkeypatch):
    """`submit`'s entrypoint starts with `python3 -m pipeline.preflight`. It checks every runtime
    dependency in the project's own metadata (matplotlib, s3fs, scipy, numpy, pyyaml... not a list
    kept by hand): a python that lacks one, or the project itself, exits 2 with one line naming it
    and the fix; this environment passes."""
    from importlib import metadata

    from pipeline import preflight

    needed = preflight.requirements()
    assert {"torch", "ray", "pyarrow", "matplotlib", "s3fs", "scipy", "numpy", "pyyaml", "typer"} <= set(needed), needed
    assert preflight.main() == 0 and capsys.readouterr().err == ""
    real = metadata.distribution
    monkeypatch.setattr(metadata, "distribution", lambda name: (_ for _ in ()).throw(metadata.PackageNotFoundError(name)) if name == "scipy" else real(name))
    assert preflight.main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks scipy" in err[0] and "setup_commands" in err[0], err
    monkeypatch.setattr(metadata, "requires", lambda name: (_ for _ in ()).throw(metadata.PackageNotFoundError(name)))
    assert preflight.main() == 2 and "lacks iwae-pipeline" in capsys.readouterr().err


def test_stalled_work_waits_for_the_autoscaler_when_it_can_launch_a_node(ray_local, monkeypatch):
    """Work no live node can run (a GPU asked of this CPU-only Ray, as when spot GPU nodes are taken
    back mid-run): with a node type the autoscaler can launch that fits, the executor says so once
    and waits the autoscaler's time (IWAE_AUTOSCALE_TIMEOUT, 3 s here) before one line; without one
    it gives up after the stall timeout (0.5 s). The same rule for training and evaluation."""
    import time

    from pipeline.errors import RunFailed
    from pipeline.ray_backend import autoscaler, cluster, executor
    from pipeline.ray_backend.resources import NodeType, Resources

    c = cluster.connect()  # the session's Ray: attached, not owned
    monkeypatch.setattr(c, "check_resources", lambda res, notice=None: None)  # the up-front check would refuse or wait first
    monkeypatch.setattr(autoscaler, "AUTOSCALE_TIMEOUT_S", 3.0)
    monkeypatch.setattr(autoscaler, "request", lambda res, count: None)
    gpu_type = NodeType("gpu", {"CPU": 1.0, "GPU": 1.0}, 2)
    for what, types, expect in (("training", [gpu_type], "the autoscaler started none in 3 s"), ("evaluation", [], "for 0.5 s; 0 unit(s)")):
        c._types, c._types_read = types, True
        lines: list[str] = []
        t0 = time.monotonic()
        source = executor.Ready(None, [executor.Unit("run x", print, ())], lambda unit, value: None)
        with pytest.raises(RunFailed) as e:
            executor.run(c, source, Resources(1, 1), what=what, notice=lines.append, stall_timeout=0.5, retries=0)
        assert time.monotonic() - t0 >= (3.0 if types else 0.5)  # it did wait that long
        assert str(e.value).startswith(f"{what} stalled") and expect in str(e.value) and "\n" not in str(e.value), str(e.value)
        waiting = [line for line in lines if "waiting up to 3 s for the autoscaler to launch one" in line]
        assert len(waiting) == (1 if types else 0), lines


def test_demand_counts_the_nodes_the_autoscaler_can_add():
    """Room asked of the autoscaler for GPU work: 4 more units when a GPU type can launch 4 nodes; a
    CPU request does not count GPU types; an unlimited type (-1) counts up to the work left."""
    from pipeline.ray_backend.resources import NodeType, Resources, launchable_slots, per_node

    gpu = Resources(1, 1)
    gpu_type = NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 4)
    cpu_type = NodeType("cpu", {"CPU": 4.0}, 2)
    assert launchable_slots(gpu, [gpu_type], 100) == 4 and launchable_slots(gpu, [], 100) == 0
    assert launchable_slots(Resources(2, 0), [gpu_type, cpu_type], 100) == 2 * 2
    assert launchable_slots(gpu, [NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, -1)], 7) == 7
    assert per_node(gpu, {"CPU": 9.0, "GPU": 1.0}) == 1 and per_node(Resources(2, 0), {"CPU": 9.0}) == 4


def test_the_embedded_ray_claims_the_cpus_this_process_may_use(tmp_path, monkeypatch):
    """Affinity and a cgroup quota cap the CPUs (v2 cpu.max, v1 cfs quota); no quota leaves affinity."""
    import os

    from pipeline.ray_backend.cluster import usable_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert usable_cpus(tmp_path / "none") == 64
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "cpu.max").write_text("200000 100000\n")
    assert usable_cpus(tmp_path / "v2") == 2
    (tmp_path / "v2" / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path / "v2") == 64
    (tmp_path / "v1" / "cpu").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "v1" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path / "v1") == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert usable_cpus(tmp_path / "v2") == 1


def test_gpu_fractions_ray_cannot_place_are_refused_in_one_line(capsys, tmp_path):
    """A whole GPU or 1/n is accepted; 0.3 is refused before anything starts, in one line, exit 2."""
    from pipeline.cli import main
    from pipeline.ray_backend.resources import check_gpus

    for ok in (None, 0, 1, 2, 0.5, 0.25):
        check_gpus(ok, "--gpus")
    assert main(["sweep", "demo", "--train-gpus", "0.3", "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--train-gpus 0.3 is a fraction" in err[0] and not (tmp_path / "r").exists(), err


def test_any_error_that_reaches_the_console_script_is_one_line(capsys, tmp_path, monkeypatch):
    """An exception nothing named (here a RuntimeError from the report) prints `error: <Type>: <first
    line>` and exits 1; with IWAE_DEBUG=1 the traceback comes instead."""
    import pipeline.report as report
    from pipeline.cli import main
    from pipeline.store.results import Results

    Results.open(str(tmp_path / "r"))

    def boom(*args, **kwargs):
        raise RuntimeError("the disk caught fire\nand more detail below")

    monkeypatch.setattr(report, "build_report", boom)
    assert main(["report", "--results", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: RuntimeError: the disk caught fire; run it again with IWAE_DEBUG=1 for the traceback"], err
    monkeypatch.setenv("IWAE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="caught fire"):
        main(["report", "--results", str(tmp_path / "r")])


def test_a_node_lost_while_its_storage_is_checked_is_left_out_not_counted_as_unable(ray_local, tmp_path, monkeypatch):
    """The cause of the flaky joining-node test: a node killed just before a command starts is still
    listed alive for a while, the storage probe pinned to it never runs, and that was counted as a node
    that cannot use the results location: exit 2 before any work. Now it is left out (it runs no work),
    and the live node is checked. (With the old count this raises UserError "1 of 2 nodes cannot use".)"""
    import ray

    from pipeline.ray_backend import cluster
    from pipeline.store.results import Results

    c = cluster.connect()
    real = c.work_nodes()
    gone = {"NodeID": "e" * 56, "Alive": True, "Resources": {"CPU": 1.0}}  # listed alive, but no raylet behind it
    monkeypatch.setattr(c, "work_nodes", lambda: [*real, gone])
    res = Results.open(str(tmp_path / "r"))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("Ctx", (), {"get_node_id": lambda self: "elsewhere"})())
    c.check_storage(res)  # does not raise
    assert (res.store.location, real[0]["NodeID"]) in c.checked and (res.store.location, "e" * 56) not in c.checked


@pytest.mark.slow
def test_a_gpu_task_gets_a_worker_of_its_own_so_two_tasks_never_share_a_device(tmp_path):
    """Ray's options of the executor's task, read back from the remote function, and in use on a
    local Ray with two (declared) GPUs: every GPU task runs in a fresh worker process (max_calls=1:
    a worker that initialised CUDA keeps its CUDA_VISIBLE_DEVICES), while CPU tasks reuse workers."""
    import json
    import os
    import subprocess
    import sys

    code = """
import json, os, ray
from pipeline.ray_backend.executor import remote_task
from pipeline.ray_backend.resources import Resources
ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
def where(): return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")
gpu, cpu = remote_task(Resources(1, 1), 3), remote_task(Resources(1, 0), 3)
out = {}
out["gpu"] = ray.get([gpu.remote(where, (), 1) for _ in range(4)])
out["cpu"] = ray.get([cpu.remote(where, (), 1) for _ in range(4)])
print(json.dumps(out))
"""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert len({pid for pid, _ in got["gpu"]}) == 4 and {dev for _, dev in got["gpu"]} <= {"0", "1"}
    assert len({pid for pid, _ in got["cpu"]}) <= 2  # reused workers: torch is imported once per worker
