"""Ray tasks: the evaluation's executor (the estimate ledger decides which ranges to score)."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pipeline.datasource import DataSource
from pipeline.errors import RunFailed, UserError
from pipeline.estimates import Span
from pipeline.ledger import EstimateLedger
from pipeline.ray_backend import autoscaler
from pipeline.ray_backend.cluster import INTERRUPTED, Resources, can_run, check_resources, check_storage, interrupt_guard, work_nodes
from pipeline.work import scorer


def _score(ledger: EstimateLedger, data: DataSource, span: Span, threads: int) -> Any:
    """A Ray task: score one range on whichever node Ray picks, with this process's cached model."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return scorer(ledger, data).score(span)


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


_TRANSIENT = "OSError"


def _outcome(ref: Any, ledger: EstimateLedger, item: Span, max_retries: int) -> int | str:
    """A finished task's shard written (its row count), or why not in one line. Every Ray error
    (a lost worker or node after Ray's own retries, out of memory, a runtime environment that would
    not set up, a full object store) and an ``OSError`` (reading or writing the store) is a reason,
    never a traceback; reasons starting with ``OSError`` are transient and retried by the caller.
    A ``UserError`` raised inside the task (bad input) is raised again here, the same one line."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    try:
        table = ray.get(ref)
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, OSError):
            return f"OSError: {str(cause).strip().splitlines()[-1][:160] if str(cause).strip() else type(cause).__name__}"
        return str(cause or e).strip().splitlines()[-1][:160]
    except _system_errors() as e:
        return f"{type(e).__name__} after {max_retries} retries"
    except RayError as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    try:
        return ledger.write(item, table)
    except OSError as e:
        return f"OSError writing it: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"
    except Exception as e:  # noqa: BLE001  # a shard that does not check out (rows, schema): named, never a traceback
        return f"{type(e).__name__} writing it: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _per_node(res: Resources, offer: Mapping[str, float]) -> int:
    """How many tasks of ``res`` one offer (a node, a node type or the whole cluster) runs at once."""
    by_cpu = int(offer.get("CPU", 0) // res.cpus) if res.cpus else 1 << 30
    by_gpu = int(offer.get("GPU", 0) // res.gpus) if res.gpus else by_cpu
    return min(by_cpu, by_gpu)


def shards_at_once(res: Resources, cluster: Mapping[str, float], types: Sequence[Any], n_items: int) -> int:
    """Shards kept running (twice as many in flight): what the live cluster runs at once, plus what the
    node types the autoscaler can launch would run at their ``max_workers`` (a negative count, Ray's
    "unlimited" in a cluster config, as many as there are shards), so that the demand it sees is large
    enough to scale up (sized by the live nodes alone, a cluster that starts with one GPU worker would
    never get a second). A request with no GPU does not count GPU types: CPU shards must not make the
    autoscaler launch GPU nodes. At least 1, at most the shards."""
    live = _per_node(res, cluster)
    more = 0
    for t in types:
        if res.gpus == 0 and t.resources.get("GPU", 0) > 0:
            continue
        per = _per_node(res, t.resources)
        more += n_items if t.max_workers < 0 and per > 0 else max(t.max_workers, 0) * per
    return max(1, min(n_items, live + more))


def _relaunch_limit(stall_timeout: float) -> float:
    """How long an evaluation waits for the autoscaler to replace the nodes it lost."""
    return max(stall_timeout, autoscaler.AUTOSCALE_TIMEOUT_S)


def _stalled(res: Resources, seconds: float, stall_timeout: float, relaunch: bool, kept: str) -> None:
    """Give up on an evaluation no live node can run: after ``stall_timeout`` seconds, or, when the
    autoscaler can launch a node that fits (``relaunch``: spot nodes taken back, say), after its own
    wait (``IWAE_AUTOSCALE_TIMEOUT``), since a cloud node takes minutes to start."""
    limit = _relaunch_limit(stall_timeout)
    if relaunch and seconds > limit:
        raise RunFailed(
            f"evaluation stalled: no node left can run a shard ({res}) and the autoscaler started none in {limit:g} s; {kept}; "
            "see `ray status` on the head (cloud quota, instance type), then run the same command again"
        )
    if not relaunch and seconds > stall_timeout:
        raise RunFailed(f"evaluation stalled: no node left can run a shard ({res}) for {stall_timeout:g} s; {kept}; add nodes and run the same command again")


def score_ranges(
    ledger: EstimateLedger,
    data: DataSource,
    items: Sequence[Span],
    res: Resources,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    timings: dict[str, float] | None = None,
    notice: Callable[[str], None] | None = None,
    max_retries: int = 3,
    stall_timeout: float = 300.0,
) -> int:
    """The Ray executor: score the (run, shard) ``items`` as Ray tasks; the driver writes each shard
    (:meth:`ShardLedger.write`). Returns the rows written.

    Why tasks and not an actor pool: a task whose worker or node is lost is retried by Ray on any
    node that is left (``max_retries``), while an actor pool waits for its dead actor to come back,
    which never happens when the surviving actors hold every free CPU (the hang this replaces).
    Each worker process keeps its model and data between shards (:func:`pipeline.work.scorer`), so
    tasks cost what actors did. The driver is the one writer: it checks each returned shard and
    writes it whole, so a shard computed twice (a retry of a task whose result was lost) is written
    twice with the same content, never duplicated. When a shard runs out of retries the others
    still finish and are kept, then ``RunFailed`` names it.

    Every run of ``items`` is one the command's run ledger calls done, whose final checkpoint was
    read whole when the ledger was read (:func:`pipeline.ledger.run_state`: a foreign or damaged one
    is not done, so ``evaluate`` stops in one line before Ray starts and ``sweep`` trains it again),
    or one this command has just trained (``bench``: written). It is not read again here; one that
    fails to load in a task fails that run's shards, which ``RunFailed`` names.
    """
    import ray

    if not items:
        return 0
    check_resources(res)
    check_storage(ledger.results)  # nodes an autoscaler started since the command's own check
    if workers is None:
        workers = shards_at_once(res, ray.cluster_resources(), autoscaler.launchable_types() or [], len(items))
    # max_calls=0: keep GPU workers alive between tasks too (Ray's default for GPU tasks is 1 call)
    task = ray.remote(max_calls=0)(_score).options(num_cpus=res.cpus, num_gpus=res.gpus, max_retries=max_retries, retry_exceptions=False)
    threads = max(1, int(res.cpus))
    queue = collections.deque(sorted(items))  # consecutive shards of a run: a worker reloads only when the run changes
    pending: dict[Any, Span] = {}
    failed: dict[Span, str] = {}
    retried: collections.Counter[Span] = collections.Counter()
    rows = done = 0
    alive = {n["NodeID"] for n in work_nodes()}
    relaunch: bool | None = None  # whether a node type the autoscaler can launch fits res (read when first needed)
    t0 = last_progress = time.perf_counter()
    with interrupt_guard():  # Ctrl-C: cancel what is in flight; written shards stay
        try:
            while queue or pending:
                if INTERRUPTED.is_set():  # a Ctrl-C some frame swallowed
                    raise KeyboardInterrupt
                while queue and len(pending) < 2 * workers:  # bounded in flight; Ray schedules them where resources are
                    item = queue.popleft()
                    pending[task.remote(ledger, data, item, threads)] = item
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
                now_alive = {n["NodeID"] for n in work_nodes()}
                if notice and alive - now_alive:
                    notice(f"lost {len(alive - now_alive)} node(s) of {len(alive)}; their shards are rescheduled on the {len(now_alive)} left")
                if now_alive - alive:
                    if notice:
                        notice(f"{len(now_alive - alive)} node(s) joined")
                    check_storage(ledger.results)  # a joined node that cannot use the results location: one line, before more work lands
                alive = now_alive
                for ref in ready:
                    item = pending.pop(ref)
                    why = _outcome(ref, ledger, item, max_retries)
                    if isinstance(why, int):
                        rows += why
                        done += 1
                        last_progress = time.perf_counter()
                        if progress:
                            progress(done, len(items))
                        continue
                    retried[item] += 1
                    if retried[item] <= max_retries and why.startswith(_TRANSIENT):
                        queue.append(item)  # an object-store blip: the shard is scored again
                    else:
                        failed[item] = why
                if pending and not ready and time.perf_counter() - last_progress > stall_timeout and not can_run(res):
                    if relaunch is None:  # asked once, when it first matters: can the autoscaler replace the nodes lost?
                        relaunch = bool(autoscaler.fitting_types(res, autoscaler.launchable_types()))
                        if relaunch and notice:
                            wait = f"{_relaunch_limit(stall_timeout):g} s"
                            notice(f"no node left can run a shard ({res}); waiting for the autoscaler to launch one, up to {wait} from the last shard written")
                    _stalled(res, time.perf_counter() - last_progress, stall_timeout, relaunch, f"{done} of {len(items)} shards are written and kept")
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
    if timings is not None:
        timings["work_seconds"] = time.perf_counter() - t0
    if failed:
        span, why = next(iter(sorted(failed.items())))
        more = f" and {len(failed) - 1} more range(s)" if len(failed) > 1 else ""
        raise RunFailed(f"evaluation of {span}{more} failed ({why}); the {done} ranges written are kept; run the same command again to finish")
    return rows
