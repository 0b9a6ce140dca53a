"""The autoscaler: which node types it can launch, and waiting for it to launch one.

- ``launchable_types``: the worker node types this cluster's autoscaler can launch, read once per
  cluster from the GCS's cluster config or the head's autoscaling config.
- ``_await_node``: hold a request's resources with a placeholder task until the autoscaler has
  started a node for it, with one status line.

The decisions (does a request fit, wait or refuse) are :func:`pipeline.ray_backend.cluster.check_resources`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import RunFailed, UserError
from pipeline.ray_backend.cluster import FEWER_CPUS_FIX, Notice, Resources, _hostport, fits


@dataclass(frozen=True)
class NodeType:
    """A kind of worker node the cluster's autoscaler can launch, and what one such node offers."""

    name: str
    resources: Mapping[str, float]
    max_workers: int


AUTOSCALE_TIMEOUT_S = float(os.environ.get("IWAE_AUTOSCALE_TIMEOUT", "900"))  # a cloud node takes minutes; a quota error never ends
_TYPES: dict[str, list[NodeType] | None] = {}  # per cluster (GCS address): the node types do not change while a command runs


def launchable_types() -> list[NodeType] | None:
    """The node types the cluster's autoscaler can launch ([] without an autoscaler; None: unknown).

    Ray 2.60 has no public API for this. Two sources, in order (checked on Ray's fake_multinode
    autoscaling cluster, autoscaler v1, the one ``ray up`` starts):

    1. ``ray._private.state.state.get_cluster_config()``: the node groups (resources, min and max
       count) that the GCS keeps when the autoscaler reports them (KubeRay, autoscaler v2). Ray Train
       v2 (``get_max_resources_from_cluster_config``) and Ray Data read the same key for the same
       question, so it is the source Ray itself relies on. On a ``ray up`` cluster it is None.
    2. The head's autoscaling config: the file the autoscaler on the head was started with
       (``ray start --head --autoscaling-config=~/ray_bootstrap_config.yaml``, written by ``ray
       up``), found in the monitor process's arguments and read by a zero-CPU task pinned to the
       head. Its ``available_node_types`` are exactly what that autoscaler launches from. A monitor
       without the flag means a fixed-size cluster: [].

    Not used: the monitor's status in the GCS KV (``DEBUG_AUTOSCALING_STATUS``, what ``ray status``
    prints) and ``ray.autoscaler.v2.sdk.get_cluster_status``: both list live nodes, pending launches
    and pending demands, but no node types, and an infeasible demand only shows as an autoscaler
    event line sent to drivers. When neither source answers,
    :func:`~pipeline.ray_backend.cluster.check_resources` falls back on submitting the request and
    watching whether the autoscaler starts a launch for it.
    """
    import ray

    try:
        gcs = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001  # a Ray Client connection has none to give
        return None
    if gcs not in _TYPES:
        _TYPES[gcs] = _types_from_cluster_config()
        if _TYPES[gcs] is None:
            _TYPES[gcs] = _types_from_head(gcs)
    return _TYPES[gcs]


def fitting_types(res: Resources, types: list[NodeType] | None) -> list[NodeType]:
    """The node types of ``types`` (:func:`launchable_types`) that fit one worker of ``res``, the
    smallest first (fewest GPUs, then CPUs): the one a request for ``res`` makes the autoscaler launch."""
    return sorted((t for t in types or [] if fits(res, t.resources)), key=lambda t: (t.resources.get("GPU", 0), t.resources.get("CPU", 0)))


def _types_from_cluster_config() -> list[NodeType] | None:
    import ray._private.state

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001  # a private API: any change in it means "unknown here"
        return None
    if config is None or not config.node_group_configs:
        return None
    return [
        NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count)) for g in config.node_group_configs if g.max_count != 0 and g.resources
    ]


def _monitor_config(gcs_port: int) -> dict[str, Any] | None:
    """On the head node: the autoscaler monitor's config for this cluster; {} for a monitor started
    without one (a fixed-size cluster); None when no monitor of this cluster runs here."""
    import yaml

    for proc in os.listdir("/proc"):
        try:
            with open(f"/proc/{proc}/cmdline", "rb") as f:
                args = [a.decode() for a in f.read().split(b"\0") if a]
        except (OSError, ValueError):
            continue
        if not any(a.endswith("monitor.py") and "autoscaler" in a for a in args):
            continue
        flags = {a[2:].partition("=")[0]: a.partition("=")[2] for a in args if a.startswith("--")}
        if not flags.get("gcs-address", "").endswith(f":{gcs_port}"):
            continue  # another cluster's monitor on the same machine
        path = flags.get("autoscaling-config")
        if not path:
            return {}
        path = os.path.join(f"/proc/{proc}/cwd", os.path.expanduser(path))  # relative to the monitor's folder
        with open(path) as f:
            config = yaml.safe_load(f) or {}
        return {k: config.get(k) for k in ("available_node_types", "head_node_type", "max_workers")}
    return None


def _types_from_head(gcs: str) -> list[NodeType] | None:
    """Source 2 of :func:`launchable_types`: the head's autoscaling config, read on the head."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    heads = [n for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})]
    if not heads:
        return None
    read = ray.remote(num_cpus=0, max_retries=0)(_monitor_config)
    ref = read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(heads[0]["NodeID"], soft=False)).remote(_hostport(gcs)[1])
    ready, _ = ray.wait([ref], timeout=60)
    if not ready:
        ray.cancel(ref, force=True)
        return None
    try:
        config = ray.get(ref)
    except Exception:  # noqa: BLE001  # no /proc, an unreadable file: unknown, not an error of the user's
        return None
    return None if config is None else _worker_types(config)


def _worker_types(config: Mapping[str, Any]) -> list[NodeType] | None:
    """The worker types of an autoscaling config that may launch a node (None: a type whose
    resources the config leaves to the cloud provider, unknown here)."""
    types, limit = config.get("available_node_types") or {}, config.get("max_workers")
    out = []
    for name, t in types.items():
        count = min(t.get("max_workers", limit or 0), limit if limit is not None else 1 << 30)  # the cluster's max_workers caps every type
        if name == config.get("head_node_type") or not count:
            continue
        if not isinstance(t.get("resources"), dict):
            return None  # resources left to the cloud provider to fill in: unknown here
        out.append(NodeType(name, {k: float(v) for k, v in t["resources"].items()}, int(count)))
    return out


def _nothing() -> None:
    """A task that only holds a request's resources, so that the autoscaler launches a node for it."""


def _launching() -> bool:
    """The autoscaler is launching a node or has one starting (v1's status in the KV, or v2's)."""
    import json

    import ray
    import ray._private.ray_constants as rc
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        report = json.loads(_internal_kv_get(rc.DEBUG_AUTOSCALING_STATUS) or b"{}").get("autoscaler_report") or {}
        if report.get("pending_launches") or report.get("pending_nodes"):
            return True
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        return bool(status.pending_launches or status.pending_nodes)
    except Exception:  # noqa: BLE001  # private status formats: no answer means "not seen launching"
        return False


def _await_node(res: Resources, node_type: NodeType | None, notice: Notice | None) -> None:
    """Submit a placeholder task for ``res`` and wait until it runs: the autoscaler sees the demand,
    launches a node, and the work that follows lands there. With ``node_type`` None (the types are
    unknown) a request the autoscaler starts no launch for within 60 s is refused as infeasible."""
    import sys
    import time

    import ray

    tty = notice is None and sys.stderr.isatty()
    say = notice or (lambda line: print(line, file=sys.stderr, flush=True))
    what = f"1 {node_type.name} node" if node_type else f"a node for {res}"

    def status(waited: float) -> str:
        return f"waiting for the autoscaler: 0 of {what} up ({waited:.0f} s)" if node_type else f"waiting for the autoscaler to start {what} ({waited:.0f} s)"

    ref = ray.remote(max_retries=0)(_nothing).options(num_cpus=res.cpus, num_gpus=res.gpus).remote()
    t0 = time.monotonic()
    shown = -1e9
    launch_seen = node_type is not None
    try:
        while not ray.wait([ref], timeout=1.0)[0]:
            waited = time.monotonic() - t0
            if tty:
                print(f"\r{status(waited)}", end="", file=sys.stderr, flush=True)
            elif waited - shown >= 30:
                say(status(waited))
                shown = waited
            launch_seen = launch_seen or _launching()
            if not launch_seen and waited > 60:
                raise UserError(f"asked for {res} per worker but no node has that and the autoscaler started no node for it in 60 s; {FEWER_CPUS_FIX}, or GPUs")
            if waited > AUTOSCALE_TIMEOUT_S:
                raise RunFailed(
                    f"the autoscaler started no node for {res} in {AUTOSCALE_TIMEOUT_S:.0f} s; see `ray status` on the head (cloud quota, instance type); "
                    "IWAE_AUTOSCALE_TIMEOUT sets the wait"
                )
    finally:
        if not ray.wait([ref], timeout=0)[0]:
            ray.cancel(ref)  # still queued (a finished task is never cancelled: Ray 2.60's core worker aborts on that race)
        if tty:
            print(file=sys.stderr, flush=True)
    say(f"the autoscaler started {what} in {time.monotonic() - t0:.0f} s")
