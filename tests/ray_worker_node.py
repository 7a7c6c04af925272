"""A Ray worker node in its own process, joined to a head on loopback (tests only).

``ray start --address`` refuses to add a node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with it
set to 1 Ray swaps 127.0.0.1 for the machine's external address; tests must stay on loopback. This
starts the same raylet and object store that ``ray start --block`` would, through Ray's Node class.
Kill the process group to kill the node.

    python -m tests.ray_worker_node GCS_ADDRESS NUM_CPUS TEMP_DIR MIN_WORKER_PORT
"""

from __future__ import annotations

import signal
import socket
import sys
import time

from ray._private.node import Node
from ray._private.parameter import RayParams

_PORTS = ("dashboard_agent_listen_port", "metrics_agent_port", "metrics_export_port", "runtime_env_agent_port")


def free_ports(n: int) -> list[int]:
    """Ports free on loopback right now (the caller binds them soon after)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def main() -> None:
    gcs_address, num_cpus, temp_dir, min_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    params = RayParams(
        gcs_address=gcs_address,
        node_ip_address="127.0.0.1",
        num_cpus=num_cpus,
        object_store_memory=256 << 20,
        temp_dir=temp_dir,
        min_worker_port=min_port,
        max_worker_port=min_port + 999,
        # the ports Ray would otherwise take from fixed defaults, which another local Ray may hold
        **dict(zip(_PORTS, free_ports(len(_PORTS)), strict=True)),
    )
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(f"worker node {node.node_id} up", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
