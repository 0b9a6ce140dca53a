"""The cluster: connection, what its nodes offer, the one fit rule, the storage check, Ctrl-C.

- ``connect``: the embedded local Ray (loopback only) or an existing cluster, within a deadline.
- ``fits`` is the one rule for "does this request fit this node": CPU and GPU together. Every check
  uses it: ``check_resources`` (before any work), ``default_gpus``, the evaluation's stall check.
  They weigh the nodes that are up and the node types the autoscaler can launch
  (:mod:`~pipeline.ray_backend.autoscaler`): a request only a type meets waits for the autoscaler.
- ``check_storage``: every node that may run work can read and write the results location, the
  nodes that join later included.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from pipeline.errors import ConnectTimeout, UserError
from pipeline.results import Results
from pipeline.storage import Store

ENV_ADDRESS = "RAY_ADDRESS"
CONNECT_TIMEOUT_S = float(os.environ.get("IWAE_CONNECT_TIMEOUT", "30"))


def _hostport(address: str) -> tuple[str | None, int]:
    url = urlparse(address if "://" in address else f"tcp://{address}")
    return url.hostname, url.port or (10001 if url.scheme == "ray" else 6379)


def _probe(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at ``address``."""
    if address in ("auto", "local"):
        return
    host, port = _hostport(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise UserError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}); check --address, or omit it to run on a local Ray") from None


def _is_loopback(address: str) -> bool:
    host, _ = _hostport(address)
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None, timeout: float | None = None) -> bool:
    """Start the embedded local Ray (no address) or connect to ``address``/``$RAY_ADDRESS``.

    The local Ray binds to 127.0.0.1 with no dashboard: nothing listens beyond loopback, and its
    token-auth notice is not printed (it guards nothing there). Connecting to a cluster either
    succeeds or fails within ``timeout`` seconds (``$IWAE_CONNECT_TIMEOUT``, 30 by default) with one
    line; ``ray.init`` itself has no deadline. Returns True when this call started the connection
    (the caller then shuts it down).
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
        _probe(address)  # even when attached already: a wrong address is always reported
    if ray.is_initialized():
        return False
    address = address or os.environ.get(ENV_ADDRESS) or None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's start-up lines (the token-auth notice on a loopback-only Ray, "Connecting to ...") are
    # noise beside our own first line; its errors still show
    logging.getLogger("ray").setLevel(logging.ERROR)
    if address is None:
        _keep_loopback()
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            num_gpus=num_gpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            object_store_memory=256 * 2**20,
            log_to_driver=False,
            configure_logging=False,
        )
        from pipeline.ray_backend import autoscaler  # it imports this module: at call time, not at the top

        autoscaler._TYPES[ray.get_runtime_context().gcs_address] = []  # this process's own Ray: no autoscaler to ask
        return True
    _probe(address)
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": False, "logging_level": logging.ERROR}
    if _is_loopback(address):
        # A head on 127.0.0.1: Ray 2.60 would replace the driver's node IP by the host's address and
        # then wait for a raylet there forever. Keep the driver on loopback, as the cluster is.
        import ray._private.ray_constants as rc

        rc.ENABLE_RAY_CLUSTER = False
        kwargs["_node_ip_address"] = "127.0.0.1"
    limit = CONNECT_TIMEOUT_S if timeout is None else timeout
    outcome: dict[str, BaseException | None] = {}

    def init() -> None:
        try:
            ray.init(**kwargs)
            outcome["error"] = None
        except BaseException as e:  # reported on the main thread
            outcome["error"] = e

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
    return True


def _keep_loopback() -> None:
    """Make the embedded Ray listen on 127.0.0.1 only.

    Ray 2.60 replaces a node IP of 127.0.0.1 by the machine's reachable address
    (``services.resolve_ip_for_localhost``), and its gRPC servers then bind every interface. With
    the node IP left at 127.0.0.1 every server binds loopback (checked by tests/test_security.py).
    Only for the cluster this process starts itself; connecting to a cluster is untouched.
    """
    import ray._private.services as services

    if not hasattr(services, "_iwae_original_resolve"):
        services._iwae_original_resolve = services.resolve_ip_for_localhost  # type: ignore[attr-defined]
        services.resolve_ip_for_localhost = lambda host: host


def shutdown() -> None:
    import ray
    import ray._private.services as services

    if ray.is_initialized():
        ray.shutdown()
    if hasattr(services, "_iwae_original_resolve"):
        services.resolve_ip_for_localhost = services._iwae_original_resolve
        del services._iwae_original_resolve


@dataclass(frozen=True)
class Resources:
    """What one trial or one evaluation task asks of a node."""

    cpus: float = 1.0
    gpus: float = 0.0

    def __str__(self) -> str:
        return f"{self.cpus:g} CPU and {self.gpus:g} GPU"


def fits(res: Resources, offer: Mapping[str, float]) -> bool:
    """The one fit rule: a request fits a node when its CPUs and its GPUs fit there together."""
    return offer.get("CPU", 0) >= res.cpus and offer.get("GPU", 0) >= res.gpus


def work_nodes() -> list[dict[str, Any]]:
    """Alive nodes that can run trials or evaluation (a CPU or a GPU to offer)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and (n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0)]


def can_run(res: Resources) -> bool:
    """Some alive node can run this request now."""
    return any(fits(res, n["Resources"]) for n in work_nodes())


def default_gpus(asked: float | None) -> float:
    """The user's choice, else one GPU per worker when a live node or a node type the autoscaler
    can launch has a GPU (none otherwise)."""
    from pipeline.ray_backend import autoscaler  # it imports this module: at call time, not at the top

    if asked is not None:
        return asked
    if any(n["Resources"].get("GPU", 0) >= 1 for n in work_nodes()):
        return 1.0
    return 1.0 if any(t.resources.get("GPU", 0) >= 1 for t in autoscaler.launchable_types() or []) else 0.0


Notice = Callable[[str], None]
# the options that set a worker's request, in each command that has them
FEWER_CPUS_FIX = "ask for fewer CPUs per worker (sweep --cpus-per-trial or --eval-cpus, evaluate --cpus)"
NO_GPU_FIX = "ask for no GPU (sweep --gpus-per-trial 0 or --eval-gpus 0, evaluate --gpus 0) or use a cluster with GPUs"


def check_resources(res: Resources, notice: Notice | None = None) -> None:
    """Refuse a request that no node can meet and no node type the autoscaler can launch meets (Ray
    would wait forever instead of failing), in one line naming the largest offer. A request that
    only a type meets is submitted, so that the autoscaler launches such a node, and waited for with
    one status line on stderr (or ``notice``)."""
    from pipeline.ray_backend import autoscaler  # it imports this module: at call time, not at the top

    if can_run(res):
        return
    types = autoscaler.launchable_types()
    fitting = autoscaler.fitting_types(res, types)
    if types is not None and not fitting:
        offers = sorted(
            [(n["Resources"].get("GPU", 0), n["Resources"].get("CPU", 0), "") for n in work_nodes()]
            + [(t.resources.get("GPU", 0), t.resources.get("CPU", 0), f": node type {t.name}") for t in types],
            reverse=True,
        )
        largest = f"{offers[0][1]:g} CPU and {offers[0][0]:g} GPU{offers[0][2]}" if offers else "nothing"
        where = "no node has that and the autoscaler can launch none that has" if types else "no node has that"
        fix = NO_GPU_FIX if res.gpus > 0 and not any(g >= res.gpus for g, _, _ in offers) else FEWER_CPUS_FIX
        raise UserError(f"asked for {res} per worker but {where} (the largest offers {largest}); {fix}")
    autoscaler._await_node(res, fitting[0] if fitting else None, notice)


def _why(e: BaseException) -> str:
    """Why a node cannot use the store, in one line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _probe_store(store: Store, key: str, token: str) -> str:
    """On a node: read the driver's marker and write this node's answer beside it. Returns '' or why not."""
    try:
        if store.read_bytes(key).decode() != token:
            return "it holds another marker there"
        store.write_bytes(f"{key.rsplit('/', 1)[0]}/{socket.gethostname()}-{os.getpid()}", b"ok")
        return ""
    except FileNotFoundError:
        return "it does not see the driver's files there"
    except Exception as e:  # noqa: BLE001  # credentials, network, permissions: one line
        return _why(e)


def _answer(ref: Any) -> str:
    """A probe's answer; an error on the node (the store would not even open there) as one line."""
    import ray

    try:
        return str(ray.get(ref))
    except Exception as e:  # noqa: BLE001  # RayTaskError wrapping the node's error: one line of it
        return str(getattr(e, "cause", None) or e).strip().splitlines()[-1][:160]


_STORAGE_OK: set[tuple[str, str]] = set()  # (results location, node id): nodes this process has checked


def check_storage(results: Results) -> None:
    """Before work lands on a node: every node that may run work must read and write the results location.

    The driver writes a marker with a random token; a zero-CPU task pinned to each node reads it and
    writes an answer (Ray's ``storage_path`` guard works the same way). A node that cannot is named
    in one line with the fix. On the embedded single-node Ray there is nothing to check. Called
    before any work and again when nodes join while a command runs (an autoscaling cluster starts
    with none); a node that passed once in this process is not asked again.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = work_nodes()
    here = ray.get_runtime_context().get_node_id()
    if not nodes or (len(nodes) == 1 and nodes[0]["NodeID"] == here):
        return
    todo = [n for n in nodes if (results.store.location, n["NodeID"]) not in _STORAGE_OK]
    if not todo:
        return
    token = uuid.uuid4().hex
    key = f"_check/{token}/marker"
    results.store.write_bytes(key, token.encode())
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_store)
    try:
        refs = {
            n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(results.store, key, token)
            for n in todo
        }
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=120)
        answers = {nid: (_answer(r) if r in ready else "no answer in 120 s") for nid, r in refs.items()}
    finally:
        results.store.delete_dir(f"_check/{token}")
    _STORAGE_OK.update((results.store.location, nid) for nid, why in answers.items() if not why)
    bad = {nid: why for nid, why in answers.items() if why}
    if bad:
        nid, why = next(iter(bad.items()))
        raise UserError(f"{len(bad)} of {len(nodes)} nodes cannot use the results location {results} (node {nid[:8]}: {why}); {storage_fix(results)}")


def storage_usable_here(results: Results) -> str:
    """On a node, at the start of work: '' when this node sees the results location the driver
    opened (its marker) and can write there, else why not, in a few words (see :func:`check_storage`;
    this covers nodes that join after it ran)."""
    from pipeline.results import MARKER

    try:
        if not results.store.exists(MARKER):
            return "it does not see the driver's files there"
        key = f"_check/{uuid.uuid4().hex}"
        results.store.write_bytes(f"{key}/{socket.gethostname()}", b"ok")
        results.store.delete_dir(key)
        return ""
    except Exception as e:  # noqa: BLE001  # credentials, network, permissions: one line
        return _why(e)


def storage_fix(results: Results) -> str:
    """What to do when a node cannot use the results location."""
    fix = "pass --results s3://BUCKET/PREFIX (or gs://...)" if results.store.is_local else "give every node credentials for it (environment or IAM role)"
    return f"{fix}, or a folder all nodes share"


# set by the SIGINT handler of ``interrupt_guard``; module-level so that a pickled Tune callback
# (Tune saves its run config) refers to it by import instead of carrying a lock
INTERRUPTED = threading.Event()


@contextlib.contextmanager
def interrupt_guard() -> Iterator[None]:
    """Ctrl-C that cannot be lost: the first SIGINT raises KeyboardInterrupt *and* is remembered.

    Python runs the handler wherever the main thread is, and a KeyboardInterrupt raised inside a
    finaliser or a library frame that swallows it is lost. A sweep once went on to its end after
    Ctrl-C (under load; where the interrupt went was not found). The loops below check
    ``INTERRUPTED`` each step, and leaving the block with it set raises KeyboardInterrupt again.
    Outside the main thread nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    INTERRUPTED.clear()

    def on_sigint(signum: int, frame: object) -> None:
        INTERRUPTED.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt
