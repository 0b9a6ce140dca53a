"""Results locations written by earlier versions keep working."""

import pickle


def test_tune_state_saved_before_the_ray_backend_split_unpickles():
    """Tune's tuner.pkl of a sweep interrupted under the old layout refers to names in
    `pipeline.ray_backend` by reference; they still resolve, to the objects used now."""
    from pipeline.ray_backend import cluster, tune

    for name, now in (("_trial_name", tune._trial_name), ("_members", tune._members), ("_trainable", tune._trainable), ("INTERRUPTED", cluster.INTERRUPTED)):
        assert pickle.loads(f"cpipeline.ray_backend\n{name}\n.".encode()) is now, name
