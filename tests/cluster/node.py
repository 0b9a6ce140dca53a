"""A Ray node for the multi-node tests, in its own process (and, for workers, its own mount namespace).

    python tests/cluster/node.py head                 # prints the GCS address, then serves until killed
    python tests/cluster/node.py worker GCS_ADDRESS   # joins with 1 CPU, then serves until killed

Every node binds loopback only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` must be in the environment
before Ray is imported: otherwise Ray rewrites 127.0.0.1 to the host's address). Started by
``tests/cluster/fixture.py``; not part of the product.
"""

import os
import signal
import sys
import time

assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0", "set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"

import ray._private.node  # noqa: E402
import ray._private.parameter  # noqa: E402


def main() -> None:
    role = sys.argv[1]
    common = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20, "min_worker_port": 0, "max_worker_port": 0, "include_log_monitor": False}
    if role == "head":
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
