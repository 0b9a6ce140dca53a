"""One executor for all work: training packs and evaluation ranges as Ray tasks, with one retry rule,
one stall rule, the autoscaler's demand, and Ctrl-C; its own cost grows with the work in flight.

A unit of work (:class:`Unit`) is a module-level function and its arguments (a pack of runs to train,
a few ranges of one run's images to score), run in a Ray task on whichever node has room. A
:class:`Source` hands the executor its units (at once, or as they become free: a run another command
trains comes back held) and takes each result. The tasks write what they produce themselves (a
pack its rows and checkpoints, a scoring unit its range files): the driver only records results.

- **Retry rule.** A unit whose worker or node is lost is retried by Ray (``max_retries``, system
  failures only); the work resumes from what it wrote (a pack from its members' last checkpoints, a
  range from scratch: its numbers are seeded by image id). An ``OSError`` (the store failing past its
  own retries, :mod:`pipeline.store.errors`) is retried by the executor within the same count, after
  an exponential backoff with jitter. Anything else raised by the work is deterministic (bad data, a
  run that diverged): it is not retried; the other units finish, then one line names it and the
  command exits 1 (:class:`UnitsFailed`). A ``UserError`` (bad input) stops the command at once.
- **Stall rule.** When no live node can run the units left and the autoscaler cannot add one that
  fits, the command waits ``stall_timeout`` seconds (``IWAE_STALL_TIMEOUT``, 300) and then exits 1 in
  one line, everything written kept; when the autoscaler can launch a fitting node (spot nodes taken
  back), it waits the autoscaler's time (``IWAE_AUTOSCALE_TIMEOUT``) instead, saying so once. A unit
  the source finds hung (:meth:`Source.stalled`: a training task whose lease expired because its steps
  stopped) is cancelled and named at the end the same way.
- **Demand.** The autoscaler is asked for room for the units left (``request_resources``, withdrawn
  at the end); as many units are kept in flight as the live nodes run, twice over.
- **Cost.** Results are collected in batches (one ``ray.wait`` for the first, one for every other
  that is ready), the node table is read on a timer (:data:`NODE_POLL_S`), not per result.
- **Devices.** A GPU task runs in a worker of its own (``max_calls=1``, Ray's own default for GPU
  tasks): a worker that initialised CUDA under one ``CUDA_VISIBLE_DEVICES`` keeps it, so a reused
  worker handed another GPU would put two tasks on one device.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.errors import RunFailed, UserError
from pipeline.ray_backend import autoscaler
from pipeline.ray_backend.cluster import Cluster
from pipeline.ray_backend.resources import Resources, fits, fitting_types, launchable_slots, per_node
from pipeline.store.results import Results

STALL_TIMEOUT_S = float(os.environ.get("IWAE_STALL_TIMEOUT", "300"))
NODE_POLL_S = 2.0  # the node table (lost and joined nodes, what they offer) is read this often, not per result
BACKOFF_FIRST_S, BACKOFF_CAP_S = 2.0, 60.0  # a unit the store failed is tried again after this (doubling, jittered)


class UnitsFailed(RunFailed):
    """Some units failed for good (named); the others are done. ``failed``: unit name -> why."""

    def __init__(self, message: str, failed: dict[str, str]):
        super().__init__(message)
        self.failed = failed


def task_options(res: Resources, retries: int) -> dict[str, Any]:
    """The Ray options of every unit's task: its resources, system retries only, and a worker of its
    own for a GPU task (module docstring, "Devices"); CPU tasks reuse workers (torch imported once)."""
    return {"num_cpus": res.cpus, "num_gpus": res.gpus, "max_retries": retries, "retry_exceptions": False, "max_calls": 1 if res.gpus > 0 else 0}


def remote_task(res: Resources, retries: int) -> Any:
    """The task that runs units of ``res``: ``max_calls`` is set where the function becomes remote
    (Ray refuses it in ``.options()``), the rest as options."""
    import ray

    opts = task_options(res, retries)
    return ray.remote(max_calls=opts.pop("max_calls"))(_call).options(**opts)


def slots(cluster: Cluster, res: Resources) -> int:
    """Units of ``res`` the live nodes and the nodes the autoscaler can add run at once (at least 1)."""
    live = sum(per_node(res, n["Resources"]) for n in cluster.work_nodes())
    return max(1, live + launchable_slots(res, cluster.types() or [], 1 << 16))


@dataclass(frozen=True)
class Unit:
    """One unit of work: ``fn(*args)`` in a Ray task; ``name`` says what it is in messages."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]


class Source(Protocol):
    """Where the executor's units come from and where their results go."""

    results: Results  # the location the work writes to (nodes that join are checked against it)

    def take(self) -> list[Unit]:
        """Units ready to run now (each handed out once)."""

    def waiting(self) -> int:
        """Units still to come that are not ready yet (held by another command, say)."""

    def done(self, unit: Unit, value: Any) -> None:
        """A unit's result (an ``OSError`` here is retried like one in the task)."""

    def failed(self, unit: Unit, why: str) -> None:
        """A unit that will not finish in this command (after its retries)."""

    def tick(self) -> None:
        """Called every pass of the loop while work runs (show progress; look at held work on its own timer)."""

    def stalled(self, running: set[str], hosts: set[str]) -> list[tuple[Unit, str]]:
        """Units Ray runs now (``running``, by name) that the source finds hung, and why (cancelled and
        failed by the executor); ``hosts``: the live nodes' host names."""

    def close(self) -> None:
        """The executor is done with the source, or stops (Ctrl-C, an error): give up what it holds."""


class Ready:
    """A source whose units are all ready at once (an evaluation's ranges); ``done`` gets each result
    (what the task wrote: a count)."""

    def __init__(self, results: Results, units: Sequence[Unit], done: Callable[[Unit, Any], None] | None = None):
        self.results, self.units, self._done = results, list(units), done

    def take(self) -> list[Unit]:
        out, self.units = self.units, []
        return out

    def waiting(self) -> int:
        return 0

    def done(self, unit: Unit, value: Any) -> None:
        if self._done is not None:
            self._done(unit, value)

    def failed(self, unit: Unit, why: str) -> None:
        pass

    def tick(self) -> None:
        pass

    def stalled(self, running: set[str], hosts: set[str]) -> list[tuple[Unit, str]]:
        return []

    def close(self) -> None:
        pass


def _call(fn: Callable[..., Any], args: tuple[Any, ...], threads: int) -> Any:
    """A Ray task: one unit of work, with torch on the CPUs the task was given."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return fn(*args)


def _system_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors for lost work (a worker, actor, node or owner gone)."""
    import ray.exceptions as rex

    names = ("WorkerCrashedError", "NodeDiedError", "OwnerDiedError", "ObjectLostError", "ActorDiedError", "ActorUnavailableError", "TaskUnschedulableError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:200] if text else type(e).__name__


TRANSIENT = "OSError"


def outcome(ref: Any, source: Source, unit: Unit, retries: int) -> str | None:
    """A finished task handed to the source (None), or why not in one line. Every Ray error and an
    ``OSError`` is a reason, never a traceback; reasons starting with ``OSError`` are transient
    (the caller retries them). A ``UserError`` raised by the work is raised again here."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    try:
        value = ray.get(ref)
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, OSError):
            return f"{TRANSIENT}: {_first_line(cause)}"
        return _first_line(cause or e)
    except _system_errors() as e:
        return f"{type(e).__name__} after {retries} retries"
    except RayError as e:
        return f"{type(e).__name__}: {_first_line(e)}"
    try:
        source.done(unit, value)
    except OSError as e:
        return f"{TRANSIENT} writing it: {_first_line(e)}"
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  # a result that does not check out (rows, schema): named, never a traceback
        return f"{type(e).__name__} writing it: {_first_line(e)}"
    return None


def stalled(what: str, res: Resources, seconds: float, stall_timeout: float, relaunch: bool, kept: str) -> None:
    """The stall rule (module docstring): ``RunFailed`` once no node could run the work long enough."""
    limit = max(stall_timeout, autoscaler.AUTOSCALE_TIMEOUT_S) if relaunch else stall_timeout
    if seconds <= limit:
        return
    if relaunch:
        raise RunFailed(
            f"{what} stalled: no node left can run its work ({res}) and the autoscaler started none in {limit:g} s; {kept}; "
            "see `ray status` on the head (cloud quota, instance type), then run the same command again"
        )
    raise RunFailed(f"{what} stalled: no node left can run its work ({res}) for {limit:g} s; {kept}; add nodes and run the same command again")


def run(
    cluster: Cluster,
    source: Source,
    res: Resources,
    *,
    what: str,
    workers: int | None = None,
    retries: int = 3,
    stall_timeout: float = STALL_TIMEOUT_S,
    notice: Callable[[str], None] | None = None,
    timings: dict[str, float] | None = None,
) -> int:
    """Run every unit ``source`` hands out on Ray tasks of ``res`` (module docstring); returns the units
    done. ``workers``: units in flight at most (default: twice what the live nodes run at once).
    ``what`` names the work in messages ("training", "evaluation")."""
    import random

    import ray

    say = notice or (lambda line: None)
    cluster.check_resources(res, notice)
    task = remote_task(res, retries)
    threads = max(1, int(res.cpus))
    types = cluster.types() or []
    queue: collections.deque[Unit] = collections.deque()
    later: list[tuple[float, int, Unit]] = []  # (not before, order, unit): units the store failed, after their backoff
    pending: dict[Any, Unit] = {}
    failed: dict[str, str] = {}
    transient: collections.Counter[str] = collections.Counter()
    done = 0
    demand = -1
    nodes = cluster.work_nodes()
    alive = {n["NodeID"] for n in nodes}
    polled = time.monotonic()
    unrunnable_since: float | None = None
    relaunch: bool | None = None
    t0 = time.perf_counter()
    with cluster.interrupt_guard():  # Ctrl-C: cancel what is in flight; what is written stays
        try:
            while True:
                if cluster.interrupted.is_set():  # a Ctrl-C some frame swallowed
                    raise KeyboardInterrupt
                queue.extend(source.take())
                now = time.monotonic()
                while later and later[0][0] <= now:
                    queue.append(heapq.heappop(later)[2])
                if not queue and not pending and not later and not source.waiting():
                    break
                if now - polled >= NODE_POLL_S:  # the node table on a timer: lost and joined nodes
                    polled, nodes = now, cluster.work_nodes()
                    now_alive = {n["NodeID"] for n in nodes}
                    if alive - now_alive:
                        say(f"lost {len(alive - now_alive)} node(s) of {len(alive)}; their work is rescheduled on the {len(now_alive)} left")
                    if now_alive - alive:
                        say(f"{len(now_alive - alive)} node(s) joined")
                        failing = cluster.check_storage(source.results, joined=True)  # a joined node that cannot use the results location: one line
                        if failing:
                            say(failing)
                    alive = now_alive
                live = sum(per_node(res, n["Resources"]) for n in nodes)
                left = len(queue) + len(pending) + len(later)
                want = min(left, max(1, live + launchable_slots(res, types, left)))
                if types and want != demand:  # room for the work left, asked of the autoscaler (nothing to ask of a fixed cluster)
                    cluster.ask(res, want)
                    demand = want
                cap = workers or max(1, 2 * live, want if types else 1)
                while queue and len(pending) < cap:
                    unit = queue.popleft()
                    pending[task.remote(unit.fn, unit.args, threads)] = unit
                ready: list[Any] = []
                if pending:
                    refs = list(pending)
                    ready, rest = ray.wait(refs, num_returns=1, timeout=1.0)
                    if ready and rest:  # every other result that is in: one call, not one pass each
                        more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                        ready += more
                else:
                    time.sleep(1.0)  # only units that are not ready yet
                for ref in ready:
                    unit = pending.pop(ref)
                    why = outcome(ref, source, unit, retries)
                    if why is None:
                        done += 1
                        continue
                    transient[unit.name] += 1
                    n = transient[unit.name]
                    if why.startswith(TRANSIENT) and n <= retries:  # the store failed past its own retries: again, after a backoff
                        pause = random.uniform(0.5, 1.0) * min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** (n - 1))
                        heapq.heappush(later, (time.monotonic() + pause, next(_order), unit))
                    else:
                        _fail(source, unit, why, failed, say)
                hosts = {str(n.get("NodeManagerHostname", "")) for n in nodes}
                for unit, why in source.stalled({u.name for u in pending.values()}, hosts):
                    for ref in [r for r, u in pending.items() if u is unit]:
                        ray.cancel(ref, force=True)
                        del pending[ref]
                        _fail(source, unit, why, failed, say)
                source.tick()
                if pending and not ready and not any(fits(res, n["Resources"]) for n in nodes):
                    if unrunnable_since is None:
                        unrunnable_since = time.monotonic()
                    if relaunch is None:  # asked once, when it first matters: can the autoscaler replace the nodes lost?
                        relaunch = bool(fitting_types(res, cluster.types()))
                        if relaunch:
                            wait = f"{max(stall_timeout, autoscaler.AUTOSCALE_TIMEOUT_S):g} s"
                            say(f"no node left can run the {what}'s work ({res}); waiting up to {wait} for the autoscaler to launch one")
                    stalled(what, res, time.monotonic() - unrunnable_since, stall_timeout, relaunch, f"{done} unit(s) of {what} are done and kept")
                else:
                    unrunnable_since = None
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if demand > 0 or cluster.requested:
                cluster.ask(res, 0)
            source.close()
    if timings is not None:
        timings["work_seconds"] = time.perf_counter() - t0
    if failed:
        names = list(failed)
        named = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        why = failed[names[0]]
        raise UnitsFailed(f"{what} of {named} failed ({why}); the {done} done are kept; run the same command again to finish", failed)
    return done


_order = itertools.count()


def _fail(source: Source, unit: Unit, why: str, failed: dict[str, str], say: Callable[[str], None]) -> None:
    """A unit that will not finish in this command: recorded, and handed to the source (which may
    write a failed row: a store that fails then is said in one line, not raised)."""
    failed[unit.name] = why
    try:
        source.failed(unit, why)
    except OSError as e:
        say(f"{unit.name}: its failure could not be recorded in the results ({_first_line(e)}); a re-run tries it again")
