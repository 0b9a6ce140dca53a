"""Every Ray call of the project lives here (Ray's APIs move; keep them in one place).

- ``connect``: the embedded local Ray (loopback only) or an existing cluster, within a deadline.
- ``check_storage``: every node that may run work can read and write the results location.
- ``sweep``: one Tune trial per grid cell, retried from its checkpoints in the store, resumable.
- ``evaluate``: Ray tasks over a manifest of (run, shard) items; the driver writes each shard once.
- ``submit``/``status``/``logs``/``stop``: Ray Jobs from a laptop.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import ipaddress
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from iwae.config import RunConfig
from pipeline.errors import ConnectTimeout, RunFailed, UserError
from pipeline.results import Results
from pipeline.storage import Store
from pipeline.work import EvalPlan, load_final, mark_failed, prepare_eval, run_complete, scorer, train_members, write_shard

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


def _work_nodes() -> list[dict[str, Any]]:
    """Alive nodes that can run trials or evaluation (a CPU or a GPU to offer)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and (n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0)]


def gpus_in_cluster() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def check_resources(cpus: float, gpus: float) -> None:
    """Refuse requests the cluster can never meet (Ray would wait forever instead of failing)."""
    import ray

    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    max_gpu = max((n.get("GPU", 0) for n in nodes), default=0)
    max_cpu = max((n.get("CPU", 0) for n in nodes), default=0)
    if gpus > 0 and max_gpu < gpus:
        raise UserError(
            f"asked for {gpus:g} GPU per worker but no node has that many (cluster GPUs: {total.get('GPU', 0):g}); pass --gpus 0 or use a cluster with GPUs"
        )
    if cpus > max_cpu:
        raise UserError(f"asked for {cpus:g} CPUs per worker but the largest node has {max_cpu:g}; lower --cpus")


def _probe_store(location: str, key: str, token: str) -> str:
    """On a node: read the driver's marker and write this node's answer beside it. Returns '' or why not."""
    try:
        store = Store.open(location)
        if store.read_bytes(key).decode() != token:
            return "it holds another marker there"
        store.write_bytes(f"{key.rsplit('/', 1)[0]}/{socket.gethostname()}-{os.getpid()}", b"ok")
        return ""
    except FileNotFoundError:
        return "it does not see the driver's files there"
    except Exception as e:  # credentials, network, permissions: one line
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def check_storage(results: Results) -> None:
    """Before any work: every node that may run work must read and write the results location.

    The driver writes a marker with a random token; a zero-CPU task pinned to each node reads it and
    writes an answer (Ray's ``storage_path`` guard works the same way). A node that cannot is named
    in one line with the fix. On the embedded single-node Ray there is nothing to check.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = _work_nodes()
    here = ray.get_runtime_context().get_node_id()
    if not nodes or (len(nodes) == 1 and nodes[0]["NodeID"] == here):
        return
    token = uuid.uuid4().hex
    key = f"_check/{token}/marker"
    results.store.write_bytes(key, token.encode())
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_store)
    try:
        refs = {
            n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(results.location, key, token)
            for n in nodes
        }
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=120)
        answers = {nid: (ray.get(r) if r in ready else "no answer in 120 s") for nid, r in refs.items()}
    finally:
        results.store.delete_dir(f"_check/{token}")
    bad = {nid: why for nid, why in answers.items() if why}
    if bad:
        nid, why = next(iter(bad.items()))
        fix = "pass --results s3://BUCKET/PREFIX (or gs://...)" if results.store.is_local else "give every node credentials for it (environment or IAM role)"
        raise UserError(
            f"{len(bad)} of {len(nodes)} nodes cannot use the results location {results} (node {nid[:8]}: {why}); {fix}, or a folder all nodes share"
        )


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0


def _trainable(config: dict[str, Any]) -> None:
    """One Tune trial = one pack of runs (often a pack of one, see :mod:`iwae.pack`). On a retry (any
    node) each member resumes from its own checkpoints in the store; members already done are kept."""
    import torch
    from ray import tune

    cfgs = [RunConfig.from_dict(d) for d in _members(config)]
    results = Results(Store.open(config["results"]))
    threads = int(config.get("threads") or 0)
    if threads:
        torch.set_num_threads(threads)

    def report(row: dict[str, Any]) -> None:
        tune.report({k: v for k, v in row.items() if isinstance(v, (int, float))})

    rows = train_members(cfgs, results, config["data_dir"], on_epoch=lambda cfg, row: report(row), compile_step=config.get("compile", "auto"))
    tune.report({"done": 1, "active_h1": rows[0].get("active_h1") or 0, "final_train_bound": rows[0].get("final_train_bound") or 0.0})


def _members(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The run configs of a trial's config: its pack, or the one run of an experiment from before packs."""
    return list(config.get("pack") or [config["run"]])


def pack_runs(todo: Sequence[RunConfig], pack: int | None, gpus_per_trial: float) -> list[list[RunConfig]]:
    """The trials of a sweep: runs of one :func:`iwae.pack.pack_key` grouped in packs.

    ``pack`` is ``--pack``: a number is the largest pack; ``None`` (auto) packs up to 16 runs when a
    trial has a GPU (a pack of 16 k=50 models needs well under 1 GB) and none on CPU trials, where
    the gain is small and machine-dependent (``iwae-pipeline bench`` measures it; ``--pack N`` asks).
    """
    from iwae.pack import group_packs

    size = pack if pack is not None else (16 if gpus_per_trial > 0 else 1)
    return group_packs(list(todo), size)


def _tune_storage(results: Results) -> tuple[str, Any]:
    """Tune's ``storage_path`` and ``storage_filesystem``: the results store's ``tune/`` folder."""
    store = results.store
    return store.path(results.tune_key), None if store.is_local else store.fs


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


def _interrupt_callback() -> Any:
    """A Tune callback that re-raises a Ctrl-C some frame swallowed, at the next step of Tune's loop."""
    from ray import tune

    class InterruptCallback(tune.Callback):
        def on_step_begin(self, iteration, trials, **info):  # type: ignore[no-untyped-def]
            from pipeline import ray_backend  # by import: the callback is pickled with Tune's state

            if ray_backend.INTERRUPTED.is_set():
                raise KeyboardInterrupt

    return InterruptCallback()


def sweep(
    name: str,
    runs: Sequence[RunConfig],
    results: Results,
    data_dir: str | Path,
    res: Resources,
    max_failures: int = 2,
    progress: Callable[[str, int, int], None] | None = None,
    compile_step: bool | str = "auto",
    todo: Sequence[RunConfig] | None = None,
    pack: int | None = 1,
) -> list[str]:
    """Train every run not done yet as a Tune trial; returns the run ids trained. Raises RunFailed.

    Re-running the same command after a crash resumes: finished runs are skipped (their rows are
    done), Tune restores its experiment from the store when it can, and each trial resumes from its
    last epoch's checkpoint in the store, on whichever node it lands.
    """
    from ray import tune

    todo = list(todo) if todo is not None else [c for c in runs if not run_complete(results, c.run_id)]
    if not todo:
        return []
    check_resources(res.cpus, res.gpus)
    # Tune's new console output prints a configuration box even at verbose=0; ours is the progress bar
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ctrl-C: Tune's own handler would end every running trial as failed and advise Tuner.restore;
    # without it the interrupt reaches the CLI, which keeps what is finished and says to re-run
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    trials = pack_runs(todo, pack, res.gpus)
    # packs of one give the name an experiment had before packs (its run ids, sorted), so Tuner.restore finds it
    digest = hashlib.sha256(",".join(sorted("+".join(c.run_id for c in t) for t in trials)).encode()).hexdigest()[:8]
    exp_name = f"{name}-{digest}"
    storage_path, storage_fs = _tune_storage(results)
    exp_path = f"{storage_path}/{exp_name}"
    trainable = tune.with_resources(_trainable, {"cpu": res.cpus, "gpu": res.gpus})
    by_id = {c.run_id: c for c in todo}
    callbacks: list[Any] = [_interrupt_callback()] + ([_progress_callback(progress, len(todo))] if progress else [])
    if tune.Tuner.can_restore(exp_path, storage_filesystem=storage_fs):
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=storage_fs)
    else:
        space = {
            "pack": tune.grid_search([[c.to_dict() for c in t] for t in trials]),
            "results": results.location,
            "data_dir": str(data_dir),
            "threads": max(1, int(res.cpus)),
            "compile": compile_step,
        }
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                trial_dirname_creator=_trial_name,
                trial_name_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=exp_name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                verbose=0,
                callbacks=callbacks,
            ),
        )
    with interrupt_guard():
        grid = tuner.fit()
    failed: dict[str, str] = {}  # run id -> why
    for i in range(len(grid)):
        r = grid[i]
        members = [RunConfig.from_dict(d) for d in _members(r.config)] if r.config else []
        for cfg in members:
            if r.error is not None and not results.run_done(cfg.run_id):
                mark_failed(results, cfg, str(r.error))
                failed[cfg.run_id] = str(r.error).strip().splitlines()[-1][:160]
    for rid in by_id:
        if rid not in failed and not results.run_done(rid):
            mark_failed(results, by_id[rid], "trial did not finish")
            failed[rid] = "trial did not finish"
    if failed:
        raise RunFailed(f"{len(failed)} of {len(todo)} trials failed: " + "; ".join(f"{rid} ({by_id[rid].label()}): {why}" for rid, why in failed.items()))
    return list(by_id)


def _trial_name(trial: Any) -> str:
    """A trial is named by its first run's id, and ``+N`` for the other members of its pack."""
    members = _members(trial.config)
    first = RunConfig.from_dict(members[0]).run_id
    return first if len(members) == 1 else f"{first}+{len(members) - 1}"


def _progress_callback(progress: Callable[[str, int, int], None], total: int) -> Any:
    """A Tune callback forwarding trial events to ``progress(message, trials_done, total)``."""
    from ray import tune

    class ProgressCallback(tune.Callback):
        def __init__(self) -> None:
            self.done = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):  # type: ignore[no-untyped-def]
            if "epoch" in result:
                progress(f"{trial.trial_id[:8]} epoch {result['epoch']} bound {result.get('train_bound', float('nan')):.2f}", self.done, total)

        def on_trial_complete(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
            self.done += len(_members(trial.config))  # runs, not trials: a pack finishes several
            progress("trial finished", self.done, total)

        def on_trial_error(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
            self.done += len(_members(trial.config))
            progress("trial failed", self.done, total)

    return ProgressCallback()


def _score(results_location: str, data_dir: str, plan: EvalPlan, run_id: str, shard: int, threads: int) -> Any:
    """A Ray task: score one shard on whichever node Ray picks, with this process's cached model."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return scorer(Results(Store.open(results_location)), data_dir, plan).score(run_id, shard)


def _system_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors for lost work (a worker, actor, node or owner gone): never only RayTaskError."""
    import ray.exceptions as rex

    names = (
        "WorkerCrashedError",
        "NodeDiedError",
        "OwnerDiedError",
        "ObjectLostError",
        "ActorDiedError",
        "ActorUnavailableError",
        "TaskUnschedulableError",
        "RaySystemError",
    )
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


def evaluate(
    results: Results,
    data_dir: str | Path,
    run_ids: Sequence[str],
    plan: EvalPlan,
    res: Resources,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    timings: dict[str, float] | None = None,
    notice: Callable[[str], None] | None = None,
    max_retries: int = 3,
    stall_timeout: float = 300.0,
) -> int:
    """Score every (run, shard) not written yet as Ray tasks; the driver writes each shard. Returns rows.

    Why tasks and not an actor pool: a task whose worker or node is lost is retried by Ray on any
    node that is left (``max_retries``), while an actor pool waits for its dead actor to come back,
    which never happens when the surviving actors hold every free CPU (the hang this replaces).
    Each worker process keeps its model and data between shards (:func:`pipeline.work.scorer`), so
    tasks cost what actors did. The driver is the one writer: it checks each returned shard and
    writes it whole, so a shard computed twice (a retry of a task whose result was lost) is written
    twice with the same content, never duplicated. When a shard runs out of retries the others
    still finish and are kept, then ``RunFailed`` names it.
    """
    import ray
    from ray.exceptions import RayTaskError

    items = [(rid, s) for rid in run_ids for s in prepare_eval(results, rid, plan, notice)]
    if not items:
        return 0
    for rid in sorted({rid for rid, _ in items}):
        load_final(results, rid)  # a damaged or foreign checkpoint fails here, in one line
    check_resources(res.cpus, res.gpus)
    cluster = ray.cluster_resources()
    if workers is None:
        by_cpu = int(cluster.get("CPU", 1) // max(res.cpus, 1e-9)) if res.cpus else len(items)
        by_gpu = int(cluster.get("GPU", 0) // res.gpus) if res.gpus else by_cpu
        workers = max(1, min(len(items), by_cpu, by_gpu))
    # max_calls=0: keep GPU workers alive between tasks too (Ray's default for GPU tasks is 1 call)
    task = ray.remote(max_calls=0)(_score).options(num_cpus=res.cpus, num_gpus=res.gpus, max_retries=max_retries, retry_exceptions=False)
    threads = max(1, int(res.cpus))
    queue = collections.deque(sorted(items))  # consecutive shards of a run: a worker reloads only when the run changes
    pending: dict[Any, tuple[str, int]] = {}
    failed: dict[tuple[str, int], str] = {}
    rows = done = 0
    alive = {n["NodeID"] for n in _work_nodes()}
    t0 = last_progress = time.perf_counter()
    with interrupt_guard():  # Ctrl-C: cancel what is in flight; written shards stay
        try:
            while queue or pending:
                if INTERRUPTED.is_set():  # a Ctrl-C some frame swallowed
                    raise KeyboardInterrupt
                while queue and len(pending) < 2 * workers:  # bounded in flight; Ray schedules them where resources are
                    item = queue.popleft()
                    pending[task.remote(results.location, str(data_dir), plan, item[0], item[1], threads)] = item
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
                now_alive = {n["NodeID"] for n in _work_nodes()}
                if notice and alive - now_alive:
                    notice(f"lost {len(alive - now_alive)} node(s) of {len(alive)}; their shards are rescheduled on the {len(now_alive)} left")
                if notice and now_alive - alive:
                    notice(f"{len(now_alive - alive)} node(s) joined")
                alive = now_alive
                for ref in ready:
                    run_id, shard = pending.pop(ref)
                    try:
                        table = ray.get(ref)
                    except RayTaskError as e:
                        cause = getattr(e, "cause", None)
                        if isinstance(cause, UserError):
                            raise cause from None  # bad input found inside a task: the same one-line error
                        failed[(run_id, shard)] = str(cause or e).strip().splitlines()[-1][:160]
                        continue
                    except _system_errors() as e:
                        failed[(run_id, shard)] = f"{type(e).__name__} after {max_retries} retries"
                        continue
                    rows += write_shard(results, run_id, plan, shard, table)
                    done += 1
                    last_progress = time.perf_counter()
                    if progress:
                        progress(done, len(items))
                if pending and not ready and time.perf_counter() - last_progress > stall_timeout and not _can_run(res):
                    raise RunFailed(
                        f"evaluation stalled: no node left can run a shard ({res.cpus:g} CPU, {res.gpus:g} GPU) for {stall_timeout:.0f} s; "
                        f"{done} of {len(items)} shards are written and kept; add nodes and run the same command again"
                    )
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
    if timings is not None:
        timings["work_seconds"] = time.perf_counter() - t0
    if failed:
        (rid, shard), why = next(iter(sorted(failed.items())))
        more = f" and {len(failed) - 1} more shard(s)" if len(failed) > 1 else ""
        raise RunFailed(f"evaluation of run {rid} shard {shard}{more} failed ({why}); the {done} shards written are kept; run the same command again to finish")
    return rows


def _can_run(res: Resources) -> bool:
    return any(n["Resources"].get("CPU", 0) >= res.cpus and n["Resources"].get("GPU", 0) >= res.gpus for n in _work_nodes())


# ---------------------------------------------------------------- Ray Jobs (laptop -> cluster)


def job_client(address: str) -> Any:
    """A ``JobSubmissionClient``; token auth (default in Ray 2.60) is sent when configured.

    The token comes from ``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``/``~/.ray/auth_token`` with
    ``RAY_AUTH_MODE=token``; it is never printed or logged here.
    """
    import logging

    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray").setLevel(logging.WARNING)  # Ray logs a line per ignored file on upload
    _probe(_dashboard_hostport(address))
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # Ray raises ConnectionError/RuntimeError with long text
        msg = str(e).splitlines()[0][:160]
        hint = (
            "set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN)"
            if "auth" in msg.lower() or "401" in msg
            else "check --address (http://HEAD:8265)"
        )
        raise UserError(f"cannot reach the Ray Jobs API at {address} ({msg}); {hint}") from None


def _dashboard_hostport(address: str) -> str:
    url = urlparse(address if "://" in address else f"http://{address}")
    return f"{url.hostname}:{url.port or 8265}"


def submit(address: str, entrypoint: str, working_dir: Path, submission_id: str | None, env_vars: dict[str, str], num_gpus: float = 0.0) -> str:
    """Upload ``working_dir`` and run ``entrypoint`` on the cluster; returns the submission id."""
    client = job_client(address)
    runtime_env = {
        "working_dir": str(working_dir),
        "excludes": [".venv", ".git", "data", "results", "cache", "docs", "**/__pycache__", "*.pt"],
        "env_vars": env_vars,
    }
    try:
        return str(client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id, entrypoint_num_gpus=num_gpus or None))
    except RuntimeError as e:
        if submission_id and "already exists" in str(e):
            raise UserError(f"a job with submission id {submission_id} already exists on {address}; pass a new --submission-id") from None
        raise UserError(f"the cluster refused the job ({' '.join(str(e).split())[:300]})") from None


def status(address: str, submission_id: str) -> str:
    client = job_client(address)
    try:
        return str(client.get_job_status(submission_id))
    except RuntimeError as e:
        raise UserError(f"no job {submission_id} on {address} ({str(e).splitlines()[0][:100]}); list jobs with `ray job list`") from None


def logs(address: str, submission_id: str, follow: bool, echo: Callable[[str], None]) -> None:
    client = job_client(address)
    if not follow:
        echo(client.get_job_logs(submission_id))
        return
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            echo(chunk)

    asyncio.run(tail())


def stop(address: str, submission_id: str) -> bool:
    return bool(job_client(address).stop_job(submission_id))


def wait(address: str, submission_id: str, timeout: float) -> str:
    """Poll until the job ends (SUCCEEDED/FAILED/STOPPED) or ``timeout`` seconds pass."""
    t0 = time.monotonic()
    while True:
        st = status(address, submission_id)
        if st.split(".")[-1] in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() - t0 > timeout:
            return st
        time.sleep(2)
