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
