"""Every Ray call of the project lives in this package (Ray's APIs move; keep them in one place),
one module per Ray API it wraps:

- :mod:`~pipeline.ray_backend.cluster`: connect (embedded local Ray or a cluster), what the nodes
  offer and the one fit rule, the storage check, Ctrl-C handling.
- :mod:`~pipeline.ray_backend.tune`: the sweep's training as Tune trials.
- :mod:`~pipeline.ray_backend.tasks`: the sharded evaluation as Ray tasks.
- :mod:`~pipeline.ray_backend.jobs`: Ray Jobs from a laptop.
"""
