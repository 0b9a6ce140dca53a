"""A Ray node for the multi-node tests, in its own process (and, for workers, its own mount namespace).

    python tests/cluster/node.py head                 # prints the GCS address, then serves until killed
    python tests/cluster/node.py worker GCS_ADDRESS   # joins with 1 CPU, then serves until killed
    python tests/cluster/node.py autoscaling-head TYPES_JSON   # a 0-CPU head whose autoscaler launches worker types on demand

Every node binds loopback only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` must be in the environment
before Ray is imported: otherwise Ray rewrites 127.0.0.1 to the host's address). Started by
``tests/cluster/fixture.py``; not part of the product.
"""

import json
import os
import signal
import socket
import sys
import time

assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0", "set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"

import ray._private.node  # noqa: E402
import ray._private.parameter  # noqa: E402


def autoscaling_config(gcs_address: str, worker_types: dict) -> dict:
    """A cluster config for Ray's fake_multinode provider (RAY-NOTES section 9): the autoscaler on
    the head starts each worker node as local processes on 127.0.0.1 when demand appears."""
    return {
        "cluster_name": "iwae-test",
        "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        "idle_timeout_minutes": 5,
        "upscaling_speed": 1.0,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "nobody"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **{name: {"node_config": {}, "min_workers": 0, **t} for name, t in worker_types.items()},
        },
        **{k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands", "setup_commands")},
        **{k: [] for k in ("head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


def main() -> None:
    role = sys.argv[1]
    common = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20, "min_worker_port": 0, "max_worker_port": 0, "include_log_monitor": False}
    if role == "autoscaling-head":
        assert os.environ.get("RAY_FAKE_CLUSTER") == "1", "set RAY_FAKE_CLUSTER=1 (the fake_multinode provider refuses to start without it)"
        with socket.socket() as s:  # a free port for the GCS: the config names it before the head starts
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        path = os.path.abspath("autoscaling.json")
        with open(path, "w") as f:
            json.dump(autoscaling_config(f"127.0.0.1:{port}", json.loads(sys.argv[2])), f)
        params = ray._private.parameter.RayParams(num_cpus=0, num_gpus=0, include_dashboard=False, gcs_server_port=port, autoscaling_config=path, **common)
        node = ray._private.node.Node(params, head=True, shutdown_at_exit=True, spawn_reaper=True)
        print(node.gcs_address, flush=True)
    elif role == "head":
        params = ray._private.parameter.RayParams(num_cpus=0, num_gpus=0, include_dashboard=False, **common)
        node = ray._private.node.Node(params, head=True, shutdown_at_exit=True, spawn_reaper=True)
        print(node.gcs_address, flush=True)
    else:
        params = ray._private.parameter.RayParams(
            gcs_address=sys.argv[2], num_cpus=int(sys.argv[3]) if len(sys.argv) > 3 else 1, num_gpus=0, node_manager_port=0, **common
        )
        params.dashboard_agent_listen_port = None
        node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
        print(node.unique_id, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
