"""Every Ray call of the project lives in this package (Ray's APIs move; keep them in one place),
one module per Ray API it wraps:

- :mod:`~pipeline.ray_backend.cluster`: connect (embedded local Ray or a cluster), what the nodes
  offer and the one fit rule, the storage check, Ctrl-C handling.
- :mod:`~pipeline.ray_backend.autoscaler`: the node types the autoscaler can launch, and waiting
  for it to launch one.
- :mod:`~pipeline.ray_backend.tune`: the sweep's training as Tune trials.
- :mod:`~pipeline.ray_backend.tasks`: the sharded evaluation as Ray tasks.
- :mod:`~pipeline.ray_backend.jobs`: Ray Jobs from a laptop.
"""


def __getattr__(name: str) -> object:
    """Names that Tune experiments saved before the split pickled by reference (``tuner.pkl`` holds
    ``pipeline.ray_backend._trial_name``, the callbacks ``_members`` and ``INTERRUPTED``): such a
    sweep still restores. Resolved lazily, so importing :mod:`.jobs` stays light."""
    if name in ("_trainable", "_trial_name", "_members"):
        from pipeline.ray_backend import tune

        return getattr(tune, name)
    if name == "INTERRUPTED":
        from pipeline.ray_backend import cluster

        return cluster.INTERRUPTED
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
