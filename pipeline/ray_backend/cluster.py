"""The cluster a command runs on: connecting, and the :class:`Cluster` object connecting returns.

:func:`connect` starts the embedded local Ray (loopback only) or connects to a cluster within a
deadline, probes the Ray internals this project needs once (:mod:`~pipeline.ray_backend.adapter`),
and returns a :class:`Cluster`: the node types the autoscaler can launch, the nodes whose storage
access was checked, what this Ray offers, and the command's Ctrl-C flag. Every later step gets that
object; nothing is kept in module globals.

``Cluster.check_resources`` applies the one fit rule (:func:`~pipeline.ray_backend.resources.fits`)
to the nodes that are up and the node types the autoscaler can launch: a request only a type meets
waits for the autoscaler; one that nothing meets is refused in one line (Ray would wait forever).
``Cluster.check_storage``: every node that may run work can read and write the results location,
the nodes that join later included.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.errors import ConnectTimeout, RunFailed, UserError
from pipeline.ray_backend import adapter, autoscaler
from pipeline.ray_backend.resources import FEWER_CPUS_FIX, NO_GPU_FIX, NodeType, Resources, fits, fitting_types
from pipeline.store import errors as store_errors
from pipeline.store.objects import Store
from pipeline.store.results import Results

ENV_ADDRESS = "RAY_ADDRESS"
PROBE_GRACE_S = 60.0  # a storage probe answers within this, beyond the store's own retry bound
CONNECT_TIMEOUT_S = float(os.environ.get("IWAE_CONNECT_TIMEOUT", "30"))
Notice = Callable[[str], None]


def hostport(address: str) -> tuple[str | None, int]:
    url = urlparse(address if "://" in address else f"tcp://{address}")
    return url.hostname, url.port or (10001 if url.scheme == "ray" else 6379)


def probe_address(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at ``address``."""
    if address in ("auto", "local"):
        return
    host, port = hostport(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise UserError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}); check --address, or omit it to run on a local Ray") from None


def _is_loopback(address: str) -> bool:
    host, _ = hostport(address)
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (v2 ``cpu.max``
    or v1 ``cpu.cfs_quota_us``), at least 1. ``os.cpu_count()`` sees the host's cores: in a 2-CPU
    container on a 64-core host it would start ~64 one-CPU tasks, each loading torch and MNIST."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us"), ("cpu.cfs_quota_us", "cpu.cfs_period_us")):
        try:
            text = (cgroup / quota_file).read_text().split()
            quota, period = (text[0], text[1]) if period_file is None else (text[0], (cgroup / period_file).read_text().split()[0])
        except (OSError, IndexError):
            continue
        if quota not in ("max", "-1") and int(period) > 0:
            n = min(n, math.ceil(int(quota) / int(period)))
        break
    return max(1, n)


@dataclass
class Cluster:
    """What connecting found, passed to every step (module docstring)."""

    gcs_address: str
    owned: bool  # this command started the Ray (the embedded one) and shuts it down
    capabilities: adapter.Capabilities
    local: bool = False  # the embedded Ray: no autoscaler, one node
    shipped: bool = False  # the working_dir asked for reached every worker (Ray's runtime environment): their current folder
    requested: bool = False  # this command asked the autoscaler for room (request_resources): withdrawn when it ends
    checked: set[tuple[str, str]] = field(default_factory=set)  # (results location, node id) whose storage access was checked
    interrupted: threading.Event = field(default_factory=threading.Event)
    _types: list[NodeType] | None = None
    _types_read: bool = False

    # ------------------------------------------------------------------ nodes and types

    def work_nodes(self) -> list[dict[str, Any]]:
        """Alive nodes that can run work (a CPU or a GPU to offer)."""
        import ray

        return [n for n in ray.nodes() if n.get("Alive") and (n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0)]

    def can_run(self, res: Resources) -> bool:
        """Some alive node can run this request now."""
        return any(fits(res, n["Resources"]) for n in self.work_nodes())

    def types(self) -> list[NodeType] | None:
        """The node types the autoscaler can launch ([] without an autoscaler; None: unknown), read once."""
        if not self._types_read:
            self._types = [] if self.local else autoscaler.node_types(hostport(self.gcs_address)[1], self.capabilities)
            self._types_read = True
        return self._types

    def default_gpus(self, asked: float | None) -> float:
        """The user's choice, else one GPU per unit of work when a live node or a node type the
        autoscaler can launch has a GPU (none otherwise)."""
        if asked is not None:
            return asked
        if any(n["Resources"].get("GPU", 0) >= 1 for n in self.work_nodes()):
            return 1.0
        return 1.0 if any(t.resources.get("GPU", 0) >= 1 for t in self.types() or []) else 0.0

    def check_resources(self, res: Resources, notice: Notice | None = None) -> None:
        """Refuse a request that no node can meet and no node type the autoscaler can launch meets,
        in one line naming the largest offer. A request that only a type meets is asked of the
        autoscaler and waited for, with one status line on stderr (or ``notice``)."""
        if self.can_run(res):
            return
        types = self.types()
        fitting = fitting_types(res, types)
        if types is not None and not fitting:
            offers = sorted(
                [(n["Resources"].get("GPU", 0), n["Resources"].get("CPU", 0), "") for n in self.work_nodes()]
                + [(t.resources.get("GPU", 0), t.resources.get("CPU", 0), f": node type {t.name}") for t in types],
                reverse=True,
            )
            largest = f"{offers[0][1]:g} CPU and {offers[0][0]:g} GPU{offers[0][2]}" if offers else "nothing"
            where = "no node has that and the autoscaler can launch none that has" if types else "no node has that"
            fix = NO_GPU_FIX if res.gpus > 0 and not any(g >= res.gpus for g, _, _ in offers) else FEWER_CPUS_FIX
            raise UserError(f"asked for {res} per worker but {where} (the largest offers {largest}); {fix}")
        self.await_node(res, fitting[0] if fitting else None, notice)

    def await_node(self, res: Resources, node_type: NodeType | None, notice: Notice | None = None) -> None:
        """Ask the autoscaler for a node that fits ``res`` and wait until one is up. With ``node_type``
        None (the types are unknown) a request the autoscaler starts no launch for within 60 s is
        refused as infeasible; a launch that never comes ends after ``IWAE_AUTOSCALE_TIMEOUT``."""
        tty = notice is None and sys.stderr.isatty()
        say = notice or (lambda line: print(line, file=sys.stderr, flush=True))
        what = f"1 {node_type.name} node" if node_type else f"a node for {res}"

        def status(waited: float) -> str:
            return (
                f"waiting for the autoscaler: 0 of {what} up ({waited:.0f} s)" if node_type else f"waiting for the autoscaler to start {what} ({waited:.0f} s)"
            )

        self.ask(res, 1)
        t0 = time.monotonic()
        shown = -1e9
        launch_seen = node_type is not None
        try:
            while not self.can_run(res):
                if self.interrupted.is_set():
                    raise KeyboardInterrupt
                time.sleep(1.0)
                waited = time.monotonic() - t0
                if tty:
                    print(f"\r{status(waited)}", end="", file=sys.stderr, flush=True)
                elif waited - shown >= 30:
                    say(status(waited))
                    shown = waited
                if not launch_seen and self.capabilities.launch_status:
                    try:
                        launch_seen = adapter.launching(self.gcs_address)
                    except Exception:  # noqa: BLE001  # a private status format that moved: not seen launching (said at connect)
                        launch_seen = False
                if not launch_seen and waited > 60:
                    raise UserError(
                        f"asked for {res} per worker but no node has that and the autoscaler started no node for it in 60 s; {FEWER_CPUS_FIX}, or GPUs"
                    )
                if waited > autoscaler.AUTOSCALE_TIMEOUT_S:
                    raise RunFailed(
                        f"the autoscaler started no node for {res} in {autoscaler.AUTOSCALE_TIMEOUT_S:.0f} s; see `ray status` on the head (cloud quota, "
                        "instance type); IWAE_AUTOSCALE_TIMEOUT sets the wait"
                    )
        finally:
            if tty:
                print(file=sys.stderr, flush=True)
        say(f"the autoscaler started {what} in {time.monotonic() - t0:.0f} s")

    # ------------------------------------------------------------------ storage

    def check_storage(self, results: Results, joined: bool = False) -> str:
        """Before work lands on a node: every node that may run work must read and write the results location.

        The driver writes a marker with a random token; a zero-CPU task pinned to each node reads it and
        writes an answer (Ray's ``storage_path`` guard works the same way). A node that cannot is named
        in one line with the fix. On the embedded single-node Ray there is nothing to check. Called
        before any work and again when nodes join while a command runs (an autoscaling cluster starts
        with none); a node that passed once in this command is not asked again.

        Only a permanent refusal counts against a node (:class:`UserError`, exit 2). A store that keeps
        failing there (transient errors past their retry bound, or no answer) is named as failing:
        before any work that ends the command (:class:`RunFailed`, exit 1); for nodes that ``joined``
        mid-command the line is returned for the caller to show, and those nodes are asked again
        when the next node joins (their own tasks check the store first, too).
        """
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = self.work_nodes()
        here = ray.get_runtime_context().get_node_id()
        if not nodes or (len(nodes) == 1 and nodes[0]["NodeID"] == here):
            return ""
        todo = [n for n in nodes if (results.store.location, n["NodeID"]) not in self.checked]
        if not todo:
            return ""
        token = uuid.uuid4().hex
        key = f"_check/{token}/marker"
        results.store.write_bytes(key, token.encode())
        probe = ray.remote(num_cpus=0, max_retries=0)(_probe_store)
        try:
            refs = {
                n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(results.store, key, token)
                for n in todo
            }
            answers: dict[str, str] = {}
            wait_s = PROBE_GRACE_S + store_errors.RETRY_SECONDS  # a probe retries the store for that long before it answers "failing"
            deadline = time.monotonic() + wait_s
            while refs and time.monotonic() < deadline:
                ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=1.0)
                for nid, ref in list(refs.items()):
                    if ref in ready:
                        answers[nid] = _answer(refs.pop(nid))
                alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
                for nid in [n for n in refs if n not in alive]:  # gone while asked: its probe will never run
                    ray.cancel(refs.pop(nid), force=True)
                    answers[nid] = LOST
            answers.update({nid: f"{FAILING}no answer in {wait_s:.0f} s" for nid in refs})
        finally:
            results.store.delete_dir(f"_check/{token}")
        # A node lost while it was asked (killed just before, still listed alive until the GCS notices)
        # gave no answer about the store: it runs no work, so it is left out, not counted as one that
        # cannot use the location (that miscount stopped an evaluation with exit 2, tests/test_cluster.py).
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        answers = {nid: why for nid, why in answers.items() if why != LOST and nid in alive}
        self.checked.update((results.store.location, nid) for nid, why in answers.items() if not why)
        failing = {nid: why[len(FAILING) :] for nid, why in answers.items() if why.startswith(FAILING)}
        bad = {nid: why for nid, why in answers.items() if why and nid not in failing}
        if bad:
            nid, why = next(iter(bad.items()))
            raise UserError(f"{len(bad)} of {len(nodes)} nodes cannot use the results location {results} (node {nid[:8]}: {why}); {results.storage_fix()}")
        if failing:
            nid, why = next(iter(failing.items()))
            line = f"the results location {results} keeps failing on {len(failing)} of {len(nodes)} nodes (node {nid[:8]}: {why})"
            if not joined:
                raise RunFailed(f"{line}; nothing was started: run the same command again when the store answers")
            return f"{line}; those nodes are asked again when the next node joins"
        return ""

    # ------------------------------------------------------------------ Ctrl-C and the end

    @contextlib.contextmanager
    def interrupt_guard(self) -> Iterator[None]:
        """Ctrl-C that cannot be lost: the first SIGINT raises KeyboardInterrupt *and* is remembered.

        Python runs the handler wherever the main thread is, and a KeyboardInterrupt raised inside a
        finaliser or a library frame that swallows it is lost. The executor's loop checks
        ``interrupted`` each step, and leaving the block with it set raises KeyboardInterrupt again.
        Outside the main thread nothing is installed.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.interrupted.clear()

        def on_sigint(signum: int, frame: object) -> None:
            self.interrupted.set()
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
        if self.interrupted.is_set():
            raise KeyboardInterrupt

    def ask(self, res: Resources, count: int) -> None:
        """Ask the autoscaler for room for ``count`` units of ``res`` (0: withdraw); remembered, so
        that a command that ends in any way leaves no request behind to keep paid nodes up."""
        autoscaler.request(res, count)
        self.requested = count > 0

    def shutdown(self) -> None:
        """End a connection this command opened (the embedded Ray stops with it), withdrawing any
        request for room this command left with the autoscaler."""
        import ray

        if self.requested and ray.is_initialized():
            try:
                autoscaler.request(Resources(0.0, 0.0), 0)
            except Exception:  # noqa: BLE001  # a head already gone: nothing is left to withdraw from
                pass
            self.requested = False
        if self.owned and ray.is_initialized():
            ray.shutdown()
        if self.local:
            adapter.restore_loopback()


def connect(
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    timeout: float | None = None,
    notice: Notice | None = None,
    working_dir: str | None = None,
    excludes: list[str] | None = None,
) -> Cluster:
    """Start the embedded local Ray (no address) or connect to ``address``/``$RAY_ADDRESS``.

    The local Ray binds to 127.0.0.1 with no dashboard, and claims the CPUs this process may use
    (:func:`usable_cpus`). Connecting to a cluster either succeeds or fails within ``timeout``
    seconds (``$IWAE_CONNECT_TIMEOUT``, 30 by default) with one line; ``ray.init`` itself has no
    deadline. What this Ray lacks of the internals used here is said in one line (``notice``).
    """
    import logging

    import ray

    given = address or os.environ.get(ENV_ADDRESS) or ""
    if urlparse(given).scheme in ("http", "https"):
        # Ray's job docs say `export RAY_ADDRESS=http://HEAD:8265`, which is the Jobs API, not the cluster
        where = f"--address {address}" if address else f"{ENV_ADDRESS}={given}"
        raise UserError(
            f"{where} is the Ray Jobs (dashboard) address, which `iwae-pipeline submit --address` takes; this command connects to the "
            f"cluster itself: pass --address HOST:6379 (the head's GCS address, as `ray status` prints it), or unset {ENV_ADDRESS} to run on a local Ray"
        )
    if address:
        probe_address(address)
    caps = adapter.probe()
    if caps.missing and notice is not None:
        notice(f"note: {caps.line()}")
    address = address or os.environ.get(ENV_ADDRESS) or None
    # a user's model folder reaches a cluster's nodes as Ray's working_dir; the embedded Ray's workers
    # read it from this disk. The one exclude list decides what is left out (pipeline.shipping), not the
    # folder's .gitignore, which often names the very weights the model loads
    if working_dir and address:
        from pipeline.shipping import plan

        runtime_env: dict[str, Any] | None = {"working_dir": working_dir, "excludes": excludes if excludes is not None else plan(working_dir)[0]}
    else:
        runtime_env = None
    if ray.is_initialized():  # attached already (a test's session Ray): not ours to shut down
        if runtime_env is not None:
            raise UserError("a user's model needs its own Ray connection (this process is attached to one already); run the command on its own")
        # attached to a Ray on this machine (a notebook's, a test's): its workers read the folder from this disk, nothing is shipped
        return Cluster(ray.get_runtime_context().gcs_address, owned=False, capabilities=caps, local=address is None)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's start-up lines (the token-auth notice on a loopback-only Ray, "Connecting to ...") are
    # noise beside our own first line; its errors still show
    logging.getLogger("ray").setLevel(logging.ERROR)
    if address is None:
        adapter.keep_loopback()
        ray.init(
            address="local",
            num_cpus=num_cpus or usable_cpus(),
            num_gpus=num_gpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            object_store_memory=256 * 2**20,
            log_to_driver=False,
            configure_logging=False,
            runtime_env=runtime_env,
        )
        return Cluster(ray.get_runtime_context().gcs_address, owned=True, capabilities=caps, local=True)
    probe_address(address)
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": False, "logging_level": logging.ERROR, "runtime_env": runtime_env}
    if _is_loopback(address):
        adapter.driver_on_loopback()
        kwargs["_node_ip_address"] = "127.0.0.1"
    limit = CONNECT_TIMEOUT_S if timeout is None else timeout
    outcome: dict[str, BaseException | None] = {}

    def init() -> None:
        try:
            ray.init(**kwargs)
            outcome["error"] = None
        except BaseException as e:  # reported on the main thread
            outcome["error"] = e

    with _gitignore_off(runtime_env is not None):  # for this upload only: the process's other uploads keep Ray's default
        t = threading.Thread(target=init, daemon=True, name="ray-init")
        t.start()
        t.join(limit)
    if t.is_alive():
        raise ConnectTimeout(
            f"no answer from the Ray cluster at {address} within {limit:g} s; check that --address is the head's GCS address as `ray status` "
            "prints it (HOST:6379), and RAY_AUTH_MODE/RAY_AUTH_TOKEN; IWAE_CONNECT_TIMEOUT sets the wait"
        )
    err = outcome.get("error")
    if err is not None:
        raise UserError(f"cannot connect to Ray at {address} ({str(err).splitlines()[0][:120]}); check --address and RAY_AUTH_MODE") from None
    return Cluster(ray.get_runtime_context().gcs_address, owned=True, capabilities=caps, shipped=runtime_env is not None)


# ---------------------------------------------------------------------------------------- on a node


@contextlib.contextmanager
def _gitignore_off(on: bool) -> Iterator[None]:
    """Ray's ``.gitignore`` handling off (``RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1``, which ``ray.init``
    reads when it packs the working_dir) for the block only, the variable put back after."""
    if not on:
        yield
        return
    key = "RAY_RUNTIME_ENV_IGNORE_GITIGNORE"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _why(e: BaseException) -> str:
    """Why a node cannot use the store, in one line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


FAILING = "failing: "  # a probe's answer when the store kept failing there (transient): not a node that cannot use it


def _probe_store(store: Store, key: str, token: str) -> str:
    """On a node: read the driver's marker and write this node's answer beside it. Returns '' or why
    not; a store that keeps failing (transient errors past the retry bound) answers :data:`FAILING`."""
    from pipeline.store.errors import StoreDenied, StoreFailing

    try:
        if store.read_bytes(key).decode() != token:
            return "it holds another marker there"
        store.write_bytes(f"{key.rsplit('/', 1)[0]}/{socket.gethostname()}-{os.getpid()}", b"ok")
        return ""
    except FileNotFoundError:
        return "it does not see the driver's files there"
    except StoreFailing as e:
        return FAILING + str(e)[:200]
    except StoreDenied as e:
        return str(e).split(";")[0][:200]
    except Exception as e:  # noqa: BLE001  # the store would not even open there: one line
        return _why(e)


LOST = "the node was lost while it was asked"


def _answer(ref: Any) -> str:
    """A probe's answer; an error on the node (the store would not even open there) as one line;
    :data:`LOST` when the probe never ran because its node or worker is gone."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return str(ray.get(ref))
    except RayTaskError as e:  # the node's own error: one line of it
        return str(getattr(e, "cause", None) or e).strip().splitlines()[-1][:160]
    except ray.exceptions.RayError as e:
        gone = ("NodeDiedError", "WorkerCrashedError", "OwnerDiedError", "ObjectLostError", "TaskCancelledError")
        if any(c.__name__ in gone for c in type(e).__mro__):  # the node or its worker went away: no answer about the store
            return LOST
        text = str(e).strip()  # a node that cannot even run the probe (its runtime environment, its memory): it cannot run work either
        return f"{type(e).__name__}: {text.splitlines()[-1][:140] if text else ''}"
