"""Robustness without a cluster: state saved by earlier versions still loads; Ray and store errors in the evaluation loop are one-line reasons."""

import pickle

from pipeline.estimates import Span


def test_tune_state_saved_before_the_ray_backend_split_unpickles():
    """Tune's tuner.pkl of a sweep interrupted under the old layout refers to names in
    `pipeline.ray_backend` by reference; they still resolve, to the objects used now."""
    from pipeline.ray_backend import cluster, tune

    for name, now in (("_trial_name", tune._trial_name), ("_members", tune._members), ("_trainable", tune._trainable), ("INTERRUPTED", cluster.INTERRUPTED)):
        assert pickle.loads(f"cpipeline.ray_backend\n{name}\n.".encode()) is now, name


class _Ledger:
    """An estimate ledger whose write fails as a store blip would, or succeeds."""

    def __init__(self, error: Exception | None = None):
        self.error = error

    def write(self, span, table):
        if self.error is not None:
            raise self.error
        return 7


def test_every_ray_error_and_a_failed_shard_write_is_a_reason_never_a_traceback(monkeypatch):
    """The evaluation loop's outcome of one task: Ray's out-of-memory and runtime-env errors (not on
    the old hand-written list) and an OSError while writing the shard come back as one-line reasons;
    the OSError is marked transient (the loop retries it within --retries)."""
    import ray
    import ray.exceptions as rex

    from pipeline.ray_backend import tasks

    def raising(error):
        def get(ref):
            raise error

        return get

    for error in (rex.OutOfMemoryError("task was killed: node low on memory"), rex.RuntimeEnvSetupError("pip failed")):
        monkeypatch.setattr(ray, "get", raising(error))
        why = tasks._outcome(object(), _Ledger(), Span("run", 0, 0), 3)
        assert isinstance(why, str) and type(error).__name__ in why, why
    monkeypatch.setattr(ray, "get", lambda ref: "table")
    why = tasks._outcome(object(), _Ledger(OSError("connection reset")), Span("run", 0, 0), 3)
    assert isinstance(why, str) and why.startswith(tasks._TRANSIENT) and "connection reset" in why, why
    assert tasks._outcome(object(), _Ledger(), Span("run", 0, 0), 3) == 7


def test_a_cluster_python_without_the_project_is_named_in_one_line(tmp_path):
    """`submit`'s entrypoint starts with `python -m pipeline.preflight`: where the cluster's python lacks
    a dependency (typer here) it exits 2 with one line naming it and the fix, not a traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    fake = tmp_path / "typer"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'typer'\")\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{root}"}
    r = subprocess.run([sys.executable, "-m", "pipeline.preflight"], capture_output=True, text=True, env=env, cwd=root, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "cannot import typer" in lines[0] and "setup_commands" in lines[0], r.stderr
    ok = subprocess.run([sys.executable, "-m", "pipeline.preflight"], capture_output=True, text=True, cwd=root, timeout=120)
    assert ok.returncode == 0 and not ok.stderr.strip(), ok.stderr


def test_a_stalled_evaluation_waits_for_the_autoscaler_when_it_can_launch_a_node(ray_local, monkeypatch):
    """Shards no live node can run (a GPU asked of this CPU-only Ray, as when spot GPU nodes are
    taken back mid-evaluation): with a node type the autoscaler can launch that fits, the loop says
    so once and waits the autoscaler's time (IWAE_AUTOSCALE_TIMEOUT, 3 s here) before one line;
    without one it gives up after the stall timeout (0.5 s) as before."""
    import time

    import pytest

    from pipeline.errors import RunFailed
    from pipeline.ray_backend import autoscaler, cluster, tasks

    monkeypatch.setattr(tasks, "check_resources", lambda res: None)  # the up-front check would refuse or wait first
    monkeypatch.setattr(tasks, "check_storage", lambda results: None)

    class Ledger:
        results = None

    gpu_type = autoscaler.NodeType("gpu", {"CPU": 1.0, "GPU": 1.0}, 2)
    monkeypatch.setattr(autoscaler, "AUTOSCALE_TIMEOUT_S", 3.0)
    for types, expect in (([gpu_type], "the autoscaler started none in 3 s"), ([], "for 0.5 s; 0 of 1 shards")):
        monkeypatch.setattr(autoscaler, "launchable_types", lambda types=types: types)
        lines: list[str] = []
        t0 = time.monotonic()
        with pytest.raises(RunFailed) as e:
            tasks.score_ranges(Ledger(), None, [Span("run", 0, 0)], cluster.Resources(1, 1), notice=lines.append, stall_timeout=0.5, max_retries=0)
        assert time.monotonic() - t0 >= (3.0 if types else 0.5)  # it did wait that long
        assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)
        waiting = [line for line in lines if "waiting for the autoscaler to launch one, up to 3 s from the last shard written" in line]
        assert len(waiting) == (1 if types else 0), lines


def test_shards_in_flight_count_the_nodes_the_autoscaler_can_add():
    """A cluster with one 1-GPU worker up and a GPU type the autoscaler can launch 4 of keeps 5 GPU
    shards running (so the autoscaler sees demand for the other 4), not 1; a fixed cluster keeps what
    its nodes run; CPU shards do not count GPU types; an unlimited type (-1) counts up to the shards;
    never more than the shards, never fewer than 1."""
    from pipeline.ray_backend import autoscaler, cluster, tasks

    gpu = cluster.Resources(1, 1)
    gpu_type = autoscaler.NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 4)
    up = {"CPU": 9.0, "GPU": 1.0}  # a 0-GPU head's CPUs beside one worker
    assert tasks.shards_at_once(gpu, up, [gpu_type], 100) == 5
    assert tasks.shards_at_once(gpu, up, [], 100) == 1
    cpu_type = autoscaler.NodeType("cpu", {"CPU": 4.0}, 2)
    assert tasks.shards_at_once(cluster.Resources(2, 0), up, [gpu_type, cpu_type], 100) == 4 + 2 * 2
    unlimited = autoscaler.NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, -1)
    assert tasks.shards_at_once(gpu, up, [unlimited], 100) == 100 and tasks.shards_at_once(gpu, {}, [unlimited], 7) == 7
    assert tasks.shards_at_once(gpu, up, [gpu_type], 3) == 3 and tasks.shards_at_once(gpu, {}, [], 3) == 1
