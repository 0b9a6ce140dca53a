"""A real multi-node Ray cluster and a real S3 server on this machine, for the cluster tests.

- ``S3Server``: moto's server (``ThreadedMotoServer``) on 127.0.0.1, which pyarrow's own S3 client
  and s3fs talk to over HTTP, as they would to AWS.
- ``LocalCluster``: a head with 0 CPUs and worker nodes with 1 CPU each, every node a process of
  its own (``tests/cluster/node.py``), all on loopback. Each worker node runs in its own mount
  namespace with a private tmpfs over ``private``: a folder the driver can write to and no worker
  can see (its own data cache lives there too), so that no test passes only because the nodes of
  a one-machine cluster share a disk. Killing a worker's process group loses that node for real.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NODE = str(ROOT / "tests" / "cluster" / "node.py")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """moto in server mode on loopback; one bucket."""

    def __init__(self, bucket: str = "iwae-test"):
        from moto.server import ThreadedMotoServer

        os.environ.update(CREDENTIALS)  # the driver-side clients (CLI subprocesses inherit it)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"{host}:{port}"
        self.bucket = bucket
        self.fs().create_dir(bucket)

    def fs(self):  # type: ignore[no-untyped-def]
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True)

    def uri(self, prefix: str, form: str = "hostport") -> str:
        """The location of ``prefix`` in the bucket, its endpoint in either form pyarrow takes:
        ``endpoint_override=HOST:PORT&scheme=http`` or ``endpoint_override=http://HOST:PORT``."""
        if form == "url":
            return f"s3://{self.bucket}/{prefix}?endpoint_override=http://{self.endpoint}&region=us-east-1"
        return f"s3://{self.bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"

    def keys(self, prefix: str) -> list[str]:
        import pyarrow.fs as pafs

        infos = self.fs().get_file_info(pafs.FileSelector(f"{self.bucket}/{prefix}", recursive=True, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File)

    def put(self, key: str, data: bytes) -> None:
        with self.fs().open_output_stream(f"{self.bucket}/{key}") as f:
            f.write(data)

    def stop(self) -> None:
        self.server.stop()


class LocalCluster:
    """A 0-CPU head and ``workers`` 1-CPU worker nodes on 127.0.0.1, each worker in a private mount namespace."""

    def __init__(self, tmp: Path, workers: int = 2):
        self.tmp = tmp
        self.private = tmp / "private"  # what no worker node can see
        self.private.mkdir(parents=True, exist_ok=True)
        self.control = tmp / "faults.json"  # faults for processes started before the test (tests/faults)
        self.control.write_text("{}")
        self.env = {
            **os.environ,
            **CREDENTIALS,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback-only nodes (RAY-NOTES section 8)
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_health_check_period_ms": "1000",  # a lost node is noticed in seconds, not half a minute
            "RAY_health_check_failure_threshold": "3",
            "PYTHONPATH": str(ROOT / "tests" / "faults"),
            "IWAE_TEST_CONTROL": str(self.control),
            "IWAE_CACHE_DIR": str(self.private / "cache"),  # inside each worker's private tmpfs: a cache per node
        }
        self.head = subprocess.Popen([sys.executable, NODE, "head"], stdout=subprocess.PIPE, text=True, env=self.env, cwd=tmp, start_new_session=True)
        self.address = (self.head.stdout.readline() if self.head.stdout else "").strip()
        if not self.address:
            raise RuntimeError("the head node did not start")
        self.workers: list[subprocess.Popen] = []
        for _ in range(workers):
            self.add_worker()

    def add_worker(self, setup: str = "") -> None:
        """Start a 1-CPU worker node in its own mount namespace and wait until the cluster counts it.
        ``setup``: shell commands run in the node's private folder before the node starts (to give
        it a stale data cache, say). The node's own files are under ``/proc/<pid>/root`` + ``private``."""
        before = self.alive_cpus()
        pre = f"{setup} && " if setup else ""
        script = f"mount -t tmpfs iwae-private {self.private} && cd {self.private} && {pre}exec {sys.executable} {NODE} worker {self.address} 1"
        proc = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, start_new_session=True
        )
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"a worker node did not start (unshare/mount need root): {err[-500:]}")
        self.workers.append(proc)
        t0 = time.monotonic()
        while self.alive_cpus() < before + 1:
            if time.monotonic() - t0 > 60:
                raise RuntimeError("the worker node did not join")
            time.sleep(0.5)

    def alive_cpus(self) -> int:
        """CPUs of the alive nodes; 0 while the GCS does not answer."""
        try:
            return int(sum(n.get("CPU", 0) for n in alive_nodes(self.address, self.env)))
        except (ValueError, IndexError):
            return 0

    def kill_worker(self, i: int = 0) -> None:
        """Lose worker node ``i`` at once: SIGKILL its whole process group (raylet, workers, store)."""
        proc = self.workers.pop(i)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for pid in _children_of_session(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def set_faults(self, **faults: object) -> None:
        self.control.write_text(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in faults.items()}))

    def stop(self) -> None:
        _stop_sessions([*self.workers, self.head])


class FakeAutoscalingCluster:
    """A 0-CPU head whose autoscaler (Ray's fake_multinode provider, RAY-NOTES section 9) starts
    worker nodes of ``worker_types`` on 127.0.0.1 as demand appears; there is no worker node at first.

    ``worker_types``: ``{name: {"resources": {...}, "max_workers": n}}``. The worker nodes run in the
    head's session (the autoscaler's children), so stopping the head's session stops them all;
    nothing here runs ``ray stop``.
    """

    def __init__(self, tmp: Path, worker_types: dict):
        self.tmp = tmp
        self.env = {
            **os.environ,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback-only nodes (RAY-NOTES section 8)
            "RAY_FAKE_CLUSTER": "1",  # the fake_multinode provider requires it; its nodes inherit both
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        cmd = [sys.executable, NODE, "autoscaling-head", json.dumps(worker_types)]
        self.head = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=self.env, cwd=tmp, start_new_session=True)
        self.address = (self.head.stdout.readline() if self.head.stdout else "").strip()
        if not self.address:
            raise RuntimeError("the autoscaling head did not start")

    def worker_nodes(self) -> list[dict]:
        """Total resources of each alive node that offers a CPU or a GPU."""
        return [n for n in alive_nodes(self.address, self.env) if n.get("CPU", 0) > 0 or n.get("GPU", 0) > 0]

    def stop(self) -> None:
        _stop_sessions([self.head])


def alive_nodes(address: str, env: dict[str, str]) -> list[dict[str, float]]:
    """Total resources of each alive node in the GCS's node table at ``address``, read once.

    Asked from a fresh process, so that this one never becomes a Ray driver. Raises ValueError or
    IndexError when the GCS does not answer (nothing printed)."""
    code = (
        "import json, ray._private.ray_constants as rc; rc.ENABLE_RAY_CLUSTER = False\n"
        "from ray._raylet import GcsClient\n"
        f"c = GcsClient(address={address!r})\n"
        "print(json.dumps([dict(n.resources_total) for n in c.get_all_node_info().values() if n.state == 0]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1])


def private_mounts() -> str:
    """'' when worker nodes can get a private tmpfs (Linux, root, util-linux ``unshare``), else why not."""
    if sys.platform != "linux":
        return "needs Linux (mount namespaces)"
    if os.geteuid() != 0:
        return "needs root: each worker node mounts a private tmpfs in its own mount namespace (unshare -m)"
    if shutil.which("unshare") is None:
        return "needs util-linux's unshare"
    return ""


def _stop_sessions(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group, then SIGKILL it and whatever is left of its session (by PID)."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    time.sleep(2)
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in _children_of_session(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _children_of_session(sid: int) -> list[int]:
    """Processes still in session ``sid`` (Ray's processes that left the process group)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if os.getsid(int(p.name)) == sid:
                out.append(int(p.name))
        except (ProcessLookupError, PermissionError):
            continue
    return out


class FaultyProxy:
    """A fault-injecting proxy in front of the S3 server (:class:`pipeline.s3proxy.CountingProxy`,
    which passes everything through, a HEAD's Content-Length included), seeded:

    - ``rate``: the share of requests answered with 503 SlowDown or a dropped connection (half each);
    - ``sticky``: the share of distinct keys whose first ``streak`` requests all fail (503), more in a
      row than the clients' own retries absorb, so that the project's retry layer has to;
    - ``mode="403"``: every request is refused (Access Denied); ``mode="down"``: every request 503.

    ``uri(prefix)`` is the location through the proxy. ``faults`` counts what was injected."""

    def __init__(self, s3: S3Server, rate: float = 0.0, sticky: float = 0.0, streak: int = 12, seed: int = 0):
        import random
        import threading

        from pipeline.s3proxy import CountingProxy

        outer = self
        self.s3, self.rate, self.sticky, self.streak, self.mode = s3, rate, sticky, streak, ""
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.failed_in_a_row: dict[str, int] = {}
        self.faults: dict[str, int] = {"503": 0, "drop": 0, "sticky": 0, "403": 0}

        class Proxy(CountingProxy):
            def fault(self, method: str, path: str) -> str | None:
                return outer.fault(method, path)

        self.proxy = Proxy(s3.endpoint)
        self.endpoint = self.proxy.endpoint

    def fault(self, method: str, path: str) -> str | None:
        with self.lock:
            if self.mode in ("403", "down"):
                self.faults["403" if self.mode == "403" else "503"] += 1
                return "403" if self.mode == "403" else "503"
            key = path.split("?")[0]
            if key not in self.failed_in_a_row:
                self.failed_in_a_row[key] = self.streak if self.rng.random() < self.sticky else 0
            if self.failed_in_a_row[key] > 0:
                self.failed_in_a_row[key] -= 1
                self.faults["sticky"] += 1
                return "503"
            if self.rng.random() < self.rate:
                kind = "503" if self.rng.random() < 0.5 else "drop"
                self.faults[kind] += 1
                return kind
            return None

    def uri(self, prefix: str) -> str:
        return f"s3://{self.s3.bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"

    def stop(self) -> None:
        self.proxy.stop()
