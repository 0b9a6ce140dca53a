"""Robustness without a cluster: state saved by earlier versions still loads; Ray and store errors in the evaluation loop are one-line reasons."""

import pickle


def test_tune_state_saved_before_the_ray_backend_split_unpickles():
    """Tune's tuner.pkl of a sweep interrupted under the old layout refers to names in
    `pipeline.ray_backend` by reference; they still resolve, to the objects used now."""
    from pipeline.ray_backend import cluster, tune

    for name, now in (("_trial_name", tune._trial_name), ("_members", tune._members), ("_trainable", tune._trainable), ("INTERRUPTED", cluster.INTERRUPTED)):
        assert pickle.loads(f"cpipeline.ray_backend\n{name}\n.".encode()) is now, name


class _Ledger:
    """A shard ledger whose write fails as a store blip would, or succeeds."""

    def __init__(self, error: Exception | None = None):
        self.error = error

    def write(self, run_id, shard, table):
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
        why = tasks._outcome(object(), _Ledger(), ("run", 0), 3)
        assert isinstance(why, str) and type(error).__name__ in why, why
    monkeypatch.setattr(ray, "get", lambda ref: "table")
    why = tasks._outcome(object(), _Ledger(OSError("connection reset")), ("run", 0), 3)
    assert isinstance(why, str) and why.startswith(tasks._TRANSIENT) and "connection reset" in why, why
    assert tasks._outcome(object(), _Ledger(), ("run", 0), 3) == 7


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
