"""Every Ray internal this project reaches for, in one place, probed once when a command connects.

Ray 2.60 has no public API for some of what a command needs on a real cluster:

- ``loopback``: the embedded local Ray must listen on 127.0.0.1 only, but Ray replaces a node IP of
  127.0.0.1 by the machine's address (``ray._private.services.resolve_ip_for_localhost``), and a
  driver connecting to a head on loopback waits forever unless ``ray_constants.ENABLE_RAY_CLUSTER``
  is off (RAY-NOTES section 8);
- ``node types``: which worker node types the autoscaler can launch (the GCS's cluster config, which
  KubeRay's autoscaler v2 reports, or the head's autoscaling config found from its monitor process);
- ``launch status``: whether the autoscaler is launching a node (the monitor's status in the KV, or
  autoscaler v2's cluster status);
- ``cluster.yaml``: Ray's offline checks of a launcher config (``prepare_config``, ``validate_config``).

:func:`probe` checks that each is there in this Ray, once, and :class:`Capabilities` says in one line
what is missing and what that costs (for example "node types unknown: the GPU default is 0 until a GPU
node is up"), so a Ray upgrade that moves an internal shows at once instead of degrading silently.
The public calls (``ray.init``, ``ray.nodes``, tasks, ``ray.autoscaler.sdk.request_resources``)
are used directly by the other modules.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.ray_backend.resources import NodeType


@dataclass(frozen=True)
class Capabilities:
    """What this Ray offers of the internals above (:func:`probe`)."""

    loopback: bool  # the embedded Ray can be kept on 127.0.0.1, and a driver on a loopback head
    cluster_config: bool  # the GCS's node groups (autoscaler v2)
    head_config: bool  # the head's monitor process, to read its autoscaling config
    launch_status: bool  # whether the autoscaler is launching a node
    missing: tuple[str, ...] = field(default=())

    def line(self) -> str:
        """One line naming what is missing and its cost ("" when nothing is)."""
        return "; ".join(self.missing)


def probe() -> Capabilities:
    """Check, without calling them, that the internals this module uses exist in this Ray."""
    import ray._private.ray_constants as rc
    import ray._private.services as services
    import ray._private.state as state

    loopback = hasattr(services, "resolve_ip_for_localhost") and hasattr(rc, "ENABLE_RAY_CLUSTER")
    cluster_config = hasattr(getattr(state, "state", None), "get_cluster_config")
    head_config = os.path.isdir("/proc")
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status  # noqa: F401
        from ray.experimental.internal_kv import _internal_kv_get  # noqa: F401

        launch_status = hasattr(rc, "DEBUG_AUTOSCALING_STATUS")
    except ImportError:
        launch_status = False
    missing = []
    if not loopback:
        missing.append("this Ray cannot be kept on loopback (a local Ray may listen on every interface)")
    if not (cluster_config or head_config):
        missing.append("node types unknown: the GPU default is 0 until a GPU node is up")
    if not launch_status:
        missing.append("the autoscaler's launches cannot be seen: a request no node type meets is refused after 60 s")
    return Capabilities(loopback, cluster_config, head_config, launch_status, tuple(missing))


# ---------------------------------------------------------------------------------------- loopback


def keep_loopback() -> None:
    """Make a Ray started by this process listen on 127.0.0.1 only (see the module docstring); checked
    by tests/test_security.py. Undone by :func:`restore_loopback`."""
    import ray._private.services as services

    if hasattr(services, "resolve_ip_for_localhost") and not hasattr(services, "_iwae_original_resolve"):
        services._iwae_original_resolve = services.resolve_ip_for_localhost  # type: ignore[attr-defined]
        services.resolve_ip_for_localhost = lambda host: host


def restore_loopback() -> None:
    import ray._private.services as services

    if hasattr(services, "_iwae_original_resolve"):
        services.resolve_ip_for_localhost = services._iwae_original_resolve
        del services._iwae_original_resolve


def driver_on_loopback() -> None:
    """A head on 127.0.0.1: Ray 2.60 would replace the driver's node IP by the host's address and
    then wait for a raylet there forever. Keep the driver on loopback, as the cluster is."""
    import ray._private.ray_constants as rc

    if hasattr(rc, "ENABLE_RAY_CLUSTER"):
        rc.ENABLE_RAY_CLUSTER = False


# ---------------------------------------------------------------------------------------- node types


def cluster_config_types() -> list[NodeType] | None:
    """The node groups the GCS keeps when the autoscaler reports them (KubeRay, autoscaler v2): the
    source Ray Train v2 and Ray Data read for the same question. None when there are none (a
    ``ray up`` cluster, autoscaler v1)."""
    import ray._private.state as state

    getter = getattr(getattr(state, "state", None), "get_cluster_config", None)
    if getter is None:
        return None
    config = getter()
    if config is None or not config.node_group_configs:
        return None
    return [
        NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count)) for g in config.node_group_configs if g.max_count != 0 and g.resources
    ]


def head_monitor_config(gcs_port: int) -> dict[str, Any] | None:
    """On the head node (run as a task pinned there): the autoscaler monitor's config for this
    cluster (``ray start --head --autoscaling-config=...``, written by ``ray up``); {} for a monitor
    started without one (a fixed-size cluster); None when no monitor of this cluster runs here."""
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


def worker_types(config: dict[str, Any]) -> list[NodeType] | None:
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


def launching(gcs_address: str) -> bool:
    """The autoscaler is launching a node or has one starting (v1's status in the KV, or v2's)."""
    import ray._private.ray_constants as rc
    from ray.autoscaler.v2.sdk import get_cluster_status
    from ray.experimental.internal_kv import _internal_kv_get

    report = json.loads(_internal_kv_get(rc.DEBUG_AUTOSCALING_STATUS) or b"{}").get("autoscaler_report") or {}
    if report.get("pending_launches") or report.get("pending_nodes"):
        return True
    status = get_cluster_status(gcs_address)
    return bool(status.pending_launches or status.pending_nodes)


# ---------------------------------------------------------------------------------------- cluster.yaml


def ray_config_problem(config: dict[str, Any]) -> str:
    """Ray's own checks of a cluster launcher config, offline (there is no ``ray up --dry-run``): its
    ``prepare_config`` fills defaults and ``validate_config`` checks the schema. '' when it passes."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(config))
    except Exception as e:  # noqa: BLE001  # jsonschema.ValidationError, ValueError: one line is enough
        return str(e).splitlines()[0][:200]
    return ""
