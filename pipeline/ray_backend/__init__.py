"""Every Ray call of the project lives in this package (Ray's APIs move; keep them in one place):

- :mod:`~pipeline.ray_backend.resources`: what work asks of a node and the one fit rule (no Ray).
- :mod:`~pipeline.ray_backend.adapter`: the Ray internals used, probed once at connect.
- :mod:`~pipeline.ray_backend.autoscaler`: the node types the autoscaler can launch; demand.
- :mod:`~pipeline.ray_backend.cluster`: connect (embedded local Ray or a cluster) and the
  :class:`~pipeline.ray_backend.cluster.Cluster` every step gets; the storage check; Ctrl-C.
- :mod:`~pipeline.ray_backend.executor`: the one executor: training packs and evaluation ranges as
  Ray tasks, one retry rule, one stall rule.
- :mod:`~pipeline.ray_backend.jobs`: Ray Jobs from a laptop.
"""
