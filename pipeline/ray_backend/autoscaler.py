"""The autoscaler: which node types it can launch, asking it for nodes, and waiting for one.

- :func:`node_types`: the worker node types this cluster's autoscaler can launch, from the GCS's
  cluster config or the head's autoscaling config (:mod:`~pipeline.ray_backend.adapter`).
- :func:`request`: demand for the autoscaler through Ray's public ``request_resources``: the bundles
  the work needs, kept until the next call replaces them (``[]`` at the end of the work).

The decisions (does a request fit, wait or refuse) and the wait for a node are
:class:`pipeline.ray_backend.cluster.Cluster`'s.
"""

from __future__ import annotations

import os

from pipeline.ray_backend import adapter
from pipeline.ray_backend.resources import NodeType, Resources

AUTOSCALE_TIMEOUT_S = float(os.environ.get("IWAE_AUTOSCALE_TIMEOUT", "900"))  # a cloud node takes minutes; a quota error never ends


def node_types(gcs_port: int, caps: adapter.Capabilities) -> list[NodeType] | None:
    """The node types the cluster's autoscaler can launch ([] without an autoscaler; None: unknown).

    Ray 2.60 has no public API for this. Two sources, in order (checked on Ray's fake_multinode
    autoscaling cluster, autoscaler v1, the one ``ray up`` starts):

    1. the GCS's cluster config (:func:`~pipeline.ray_backend.adapter.cluster_config_types`), which
       KubeRay's autoscaler v2 reports; on a ``ray up`` cluster it is None;
    2. the head's autoscaling config, read by a zero-CPU task pinned to the head from the monitor
       process's arguments (:func:`~pipeline.ray_backend.adapter.head_monitor_config`): exactly what
       that autoscaler launches from. A monitor without one means a fixed-size cluster: [].
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if caps.cluster_config:
        found = adapter.cluster_config_types()
        if found is not None:
            return found
    if not caps.head_config:
        return None
    heads = [n for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})]
    if not heads:
        return None
    read = ray.remote(num_cpus=0, max_retries=0)(adapter.head_monitor_config)
    ref = read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(heads[0]["NodeID"], soft=False)).remote(gcs_port)
    ready, _ = ray.wait([ref], timeout=60)
    if not ready:
        ray.cancel(ref, force=True)
        return None
    try:
        config = ray.get(ref)
    except (ray.exceptions.RayError, OSError, ValueError):  # no /proc there, an unreadable file: unknown, not an error of the user's
        return None
    return None if config is None else adapter.worker_types(config)


def request(res: Resources, count: int) -> None:
    """Ask the autoscaler for room for ``count`` units of ``res`` at once (0: withdraw the request)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[res.bundle] * count if res.bundle else [])
