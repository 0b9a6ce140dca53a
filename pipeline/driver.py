"""Between the CLI and the backends: the steps of a command, each taking the objects it made once.

The CLI parses options, makes the :class:`~pipeline.store.results.Results` and the
:class:`~pipeline.datasource.DataSource` once, and calls these steps in order:

1. :func:`ray_session`: the Ray connection (the embedded local Ray, or a cluster) the later steps
   take, made when a step first needs it (:class:`Session`); a location this command created is
   undone if the connection or the storage check fails.
2. :func:`survey_runs`: read the job's run ledger once and repair what does not read whole; every
   later step consults that ledger.
3. :func:`check_storage`: every node can use the results location.
4. :func:`train_job`: train what the ledger says is not done (packs as tasks on the one executor,
   :mod:`pipeline.ray_backend.executor`, each run under its lease), returning the new ledger.
5. :func:`evaluate_job`: per dataset and image set, the job's estimates (:mod:`pipeline.store.estimates`),
   the ranges left of each, scored by Ray tasks or here (the executor is the only difference).
6. :func:`~pipeline.report.build_report` renders the tables.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from iwae.config import RunConfig
from iwae.evaluate import EvalConfig
from pipeline.datasource import DataSource
from pipeline.errors import RunFailed
from pipeline.store.estimates import AISPlan, EvalPlan, Plan, Span
from pipeline.store.ledger import EstimateLedger, RunLedger, repair
from pipeline.store.results import Results

Echo = Callable[[str], None]


def bar(total: int, desc: str, unit: str) -> Any:
    """A progress bar on stderr (tqdm; hidden when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=None)


def on_local_ray(address: str | None) -> bool:
    """Whether this command runs on the embedded local Ray (no address given or in the environment)."""
    return not (address or os.environ.get("RAY_ADDRESS"))


class Session:
    """The Ray connection a command's steps share, made when a step first needs Ray: a command with
    nothing left to do (a re-run of a finished grid) starts no local Ray and connects to no cluster.
    Attributes are those of the :class:`~pipeline.ray_backend.cluster.Cluster` it connects to; the
    checks asked of it (:func:`check_storage`) run on that cluster as soon as it is connected."""

    def __init__(self, connect: Callable[[], Any]):
        self._connect, self._cluster = connect, None
        self._checks: list[Callable[[Any], None]] = []
        self._undo: list[Callable[[], None]] = []  # if the connection fails (a location this command created)

    def connected(self) -> Any:
        if self._cluster is None:
            try:
                cluster = self._connect()
            except BaseException:
                for undo in self._undo:
                    with contextlib.suppress(Exception):
                        undo()
                raise
            self._cluster = cluster
            for check in self._checks:
                check(cluster)
        return self._cluster

    def __getattr__(self, name: str) -> Any:
        return getattr(self.connected(), name)

    def when_connected(self, check: Callable[[Any], None], undo: Callable[[], None] | None = None) -> None:
        """Run ``check`` on the cluster now if connected, else as soon as it is; ``undo`` if the
        connection fails."""
        if self._cluster is not None:
            check(self._cluster)
            return
        self._checks.append(check)
        if undo is not None:
            self._undo.append(undo)

    def shutdown(self) -> None:
        if self._cluster is not None:
            self._cluster.shutdown()


@contextlib.contextmanager
def ray_session(address: str | None, notice: Echo | None = None, working_dir: str | None = None, excludes: list[str] | None = None) -> Iterator[Any]:
    """Ray for the block, connected when a step first needs it (:class:`Session`): the
    :class:`~pipeline.ray_backend.cluster.Cluster` the steps get; a connection this opened is closed
    after it. ``working_dir``: a folder every worker gets (Ray's runtime environment: a user's model
    module reaches the nodes so, with no shared disk)."""
    from pipeline.ray_backend import cluster

    c = Session(lambda: cluster.connect(address, notice=notice, working_dir=working_dir, excludes=excludes))
    try:
        yield c
    finally:
        c.shutdown()


def survey_runs(results: Results, runs: Sequence[RunConfig], notice: Echo | None = None) -> RunLedger:
    """The runs' ledger (and the runs they start from), after moving damaged rows aside."""
    ledger = RunLedger.read(results, [c.run_id for c in runs] + [c.init_from for c in runs if c.init_from])
    repair(results, ledger.damaged, notice)
    return ledger


def other_cuts(results: Results, runs: Sequence[RunConfig]) -> list[str]:
    """The options under which ``runs`` (a job's selection) *are* trained in ``results``: the same runs at
    another schedule cut or size, whose ids differ (``--stages 3``, ``--size smoke``). Empty when none."""
    free = {"run_id", "stages", "epoch_scale", "epochs", "train_subset"}

    def key(flat: dict[str, Any]) -> tuple[str, ...]:
        return tuple(f"{k}={flat[k]}" for k in sorted(flat) if k not in free)

    wanted = {key(c.flat()) for c in runs}
    table = results.read("runs")
    found: dict[str, None] = {}
    for row in table[table.status == "done"].to_dict("records"):
        flat = {k: row[k] for k in RunConfig().flat()}
        if key(flat) not in wanted:
            continue
        if int(row["train_subset"]) == 400 and int(row["stages"]) == 2:
            found["--size smoke"] = None  # jobs.cut's smoke size
        else:
            opts = [f"--stages {int(row['stages'])}"] if int(row["stages"]) != 8 else []
            opts += [f"--epoch-scale {float(row['epoch_scale']):g}"] if float(row["epoch_scale"]) != 1.0 else []
            found[" ".join(opts) or "no --stages or --epoch-scale (the paper's full schedule)"] = None
    return list(found)


def missing_start(runs: Sequence[RunConfig], ledger: RunLedger) -> bool:
    """Some run still to train starts from a run that is not done (Table 2 needs Table 1's models)."""
    return any(c.init_from and not ledger.done(c.init_from) for c in ledger.todo(runs))


class StorageUnusable(RunFailed):
    """The storage check failed (a node's store kept failing): the command stops, whichever step
    connected (a sweep does not take it for a failed evaluation and go on)."""


def check_storage(cluster: Any, results: Results) -> None:
    """Every node can use the results location (checked when the :class:`Session` connects, so not
    at all by a command with nothing to do); if not, a location this command created is undone
    (only while nothing else has been written there)."""
    from pipeline.errors import UserError

    def check(c: Any) -> None:
        try:
            c.check_storage(results)
        except UserError:
            results.discard_if_new()
            raise
        except RunFailed as e:
            results.discard_if_new()
            raise StorageUnusable(str(e)) from None

    if isinstance(cluster, Session):
        cluster.when_connected(check, results.discard_if_new)
    else:
        check(cluster)


def pack_runs(todo: Sequence[RunConfig], pack: int | None, gpus: float) -> list[list[RunConfig]]:
    """The training units of a sweep: runs of one :func:`iwae.pack.pack_key` grouped in packs.

    ``pack`` is ``--pack``: a number is the largest pack; ``None`` (auto) packs up to 16 runs when a
    unit has a GPU (a pack of 16 k=50 models needs well under 1 GB) and none on CPU units, where
    the gain is small and machine-dependent (``iwae-pipeline bench`` measures it; ``--pack N`` asks).
    """
    from iwae.pack import group_packs

    return group_packs(list(todo), pack if pack is not None else (16 if gpus > 0 else 1))


@dataclass
class _Flight:
    """A training unit handed out: its token (the holder its task writes into the leases) and the
    lease generation of each member once seen held by it."""

    unit: Any
    token: str
    run_ids: list[str]
    gens: dict[str, int] = field(default_factory=dict)
    lost_at: float | None = None  # when a member's lease was first seen taken over by another


class Training:
    """The executor's source of training units (:mod:`pipeline.ray_backend.executor`): packs of runs,
    whose tasks take, renew and release the members' leases themselves (:mod:`pipeline.store.leases`).

    A run whose lease another command holds live comes back *held*, is said once, and is looked at
    again every 5 s or so (one listing of the held runs' leases, a body read per renewal): done by the other command
    (dropped: trained once), or its lease expired (the other command died or hung: handed out again,
    and resumed from its checkpoints). The driver renews nothing: it only watches the leases of the
    units in flight, on the same timer, and finds a unit hung when its task's lease expired (its steps
    stopped, so its renewals did) or was taken over and the task did not stop; the executor then
    cancels it and names it at the end. Cost per minute: proportional to the runs training now."""

    def __init__(self, results: Results, data: DataSource, packs: list[list[RunConfig]], pack: int, compile_step: bool | str, echo: Echo, bar: Any):
        from pipeline.store.leases import Leases, new_owner

        self.results, self.data, self.pack, self.compile_step, self.echo, self.bar = results, data, pack, compile_step, echo, bar
        self.command = new_owner()
        self.book = Leases(results, self.command)  # reads leases; this command holds none itself
        self.fresh = [list(p) for p in packs]  # not yet handed out
        self.held: dict[str, RunConfig] = {}  # held by another command: looked at again on the timer
        self.told: set[str] = set()
        self.inflight: dict[str, _Flight] = {}  # unit name -> its flight
        self.cfgs: dict[str, RunConfig] = {c.run_id: c for p in packs for c in p}
        self.trained: list[str] = []
        self.by_others: list[str] = []
        self.failures: dict[str, str] = {}
        self.hung: set[str] = set()  # unit names found hung (no failed rows for them: another command may be training the runs)
        self.bodies: dict[str, tuple[Any, Any]] = {}  # held run -> (its lease object as last seen, its body)
        self.last_look = self.last_watch = 0.0

    @property
    def every(self) -> float:
        return max(1.0, self.book.seconds / 3)

    def _unit(self, members: list[RunConfig]) -> Any:
        from pipeline.ray_backend.executor import Unit
        from pipeline.store.leases import new_owner
        from pipeline.work import train_unit

        name = f"run {members[0].run_id}" + (f" (+{len(members) - 1})" if len(members) > 1 else "")
        token = new_owner()
        unit = Unit(name, train_unit, (self.results, self.data, [c.to_dict() for c in members], token, self.command, self.compile_step))
        self.inflight[name] = _Flight(unit, token, [c.run_id for c in members])
        return unit

    def take(self) -> list[Any]:
        import time

        from iwae.pack import group_packs

        units = [self._unit(p) for p in self.fresh]
        self.fresh = []
        if self.held and time.monotonic() - self.last_look >= max(5.0, 0.05 * len(self.held)):  # a look costs what is held, not the grid
            self.last_look = time.monotonic()
            units += [self._unit(p) for p in group_packs(self._free(), self.pack)]
        return units

    def _free(self) -> list[RunConfig]:
        """The held runs another command no longer holds: one listing of their leases; a lease's body is
        read only when its generation or age changed since the last look (a renewal: once a minute a
        run), and a run's files only once its lease is released or expired (done by the other command:
        dropped, trained once; else handed out again, resumed from its checkpoints)."""
        from pipeline.store.leases import Seen
        from pipeline.store.ledger import RunState, run_state

        try:
            seen = self.book.seen_many(list(self.held))
        except OSError:
            return []  # the store kept failing: looked at again on the next round
        free = []
        for rid, s in seen.items():
            try:
                if s.generation and s.age < self.book.seconds:
                    key = (s.generation, s.mtime)  # the same object as last time: its body has not changed
                    if self.bodies.get(rid, (None, None))[0] != key:
                        self.bodies[rid] = (key, self.book.body(rid, s.generation))
                    if self.book.live(Seen(s.generation, s.age, self.bodies[rid][1])):
                        continue  # still trained by the other command
                if run_state(self.results, rid).state == RunState.done:  # the other command finished it
                    del self.held[rid]
                    self.by_others.append(rid)
                    self.bar.update(1)
                    self.echo(f"run {rid} was trained by the other command")
                    continue
            except OSError:
                continue
            free.append(self.held.pop(rid))  # its lease ran out or was released: trained here, resumed from its checkpoints
        return free

    def waiting(self) -> int:
        return len(self.held)

    def done(self, unit: Any, value: dict[str, Any]) -> None:
        flight = self.inflight.pop(unit.name, None)
        rows = value.get("rows", [])
        trained = [r["run_id"] for r in rows if r.get("status") == "done"]
        for r in rows:
            if r.get("status") != "done":  # a member that diverged: its failed row is written; the others of its pack are kept
                self.failures[r["run_id"]] = str(r.get("error") or "failed")
        self.trained += trained
        self.bar.update(len(rows))
        runs = ", ".join(flight.run_ids) if flight else unit.name
        for line in dict.fromkeys(value.get("notes", [])):  # what the task's warnings said, once per unit, on the driver's console
            self.echo(f"run {runs}: {line}")
        for rid, by in value.get("held", {}).items():
            self.held[rid] = self.cfgs[rid]
            if rid not in self.told:
                self.told.add(rid)
                self.echo(f"run {rid} is being trained by another command ({by}); this one waits for it, or for its lease to expire")
        if value.get("lost"):  # another command took the runs over: wait for it like for any held run
            self.echo(str(value["lost"]))
            for rid in flight.run_ids if flight else []:
                if rid not in trained and rid not in self.failures:
                    self.held[rid] = self.cfgs[rid]

    def failed(self, unit: Any, why: str) -> None:
        from pipeline.work import mark_failed

        flight = self.inflight.pop(unit.name, None)
        if flight is None:
            return
        for rid in flight.run_ids:
            if unit.name not in self.hung and not self._held_by_another(rid, flight.token):
                mark_failed(self.results, self.cfgs[rid], why)  # reports show it; never over a done run, nor one another command trains
            self.failures[rid] = why
        self.bar.update(len(flight.run_ids))

    def _held_by_another(self, rid: str, token: str) -> bool:
        from pipeline.store.leases import Seen

        try:
            s = self.book.seen(rid, body=True)
        except OSError:
            return True  # cannot tell: no failed row (a re-run finds the run not done either way)
        return (s.body or {}).get("owner") != token and self.book.live(Seen(s.generation, s.age, s.body, s.mtime))

    def stalled(self, running: set[str] | None = None, hosts: set[str] | None = None) -> list[tuple[Any, str]]:
        """Units whose task hangs, by their leases (class docstring), looked at every third of a
        lease with one listing: a unit Ray runs now (``running``) whose task took a lease, has not
        released it, runs on a live host (``hosts``: a task whose node died waits for Ray's retry,
        not for this rule), and let it expire; or a unit whose lease another command took over and
        whose task did not stop within a lease. A lease body is read once per generation and renewal."""
        import time

        now = time.monotonic()
        if not self.inflight or now - self.last_watch < self.every:
            return []
        self.last_watch = now
        watched = {name: f for name, f in self.inflight.items() if running is None or name in running}
        try:
            seen = self.book.seen_many([rid for f in watched.values() for rid in f.run_ids])  # one listing for many
        except OSError:
            return []  # the store kept failing: looked at again next time
        out = []
        for name, flight in watched.items():
            why = ""
            for rid in flight.run_ids:
                s = seen[rid]
                if not s.generation:
                    continue  # its task has not taken the lease yet
                try:
                    key = (s.generation, s.mtime)
                    if self.bodies.get(rid, (None, None))[0] != key:
                        self.bodies[rid] = (key, self.book.body(rid, s.generation))
                except OSError:
                    continue  # the store kept failing: looked at again next time
                body = self.bodies[rid][1] or {}
                mine = body.get("owner") == flight.token
                if mine:
                    flight.gens[rid] = s.generation
                elif rid in flight.gens and s.generation > flight.gens[rid]:  # taken over while this unit holds it: its task should stop
                    flight.lost_at = flight.lost_at or now
                alive = hosts is None or body.get("host") in hosts
                if mine and not body.get("released") and alive and s.age >= self.book.seconds:
                    why = f"its task made no training step for over {s.age:.0f} s, so its lease on run {rid} expired (another command may take it over)"
                elif flight.lost_at is not None and now - flight.lost_at >= self.book.seconds:
                    why = f"another command took run {rid} over and its task did not stop within {self.book.seconds:.0f} s"
                if why:
                    break
            if why:
                self.hung.add(name)
                out.append((flight.unit, f"stalled: {why}; its checkpoints are kept"))
        return out

    def close(self) -> None:
        """Release the leases the tasks in flight held (the executor has cancelled them: a command
        interrupted, or stopped by an error), so another command may take the runs over at once."""
        from pipeline.store.leases import Lease, Leases

        for flight in self.inflight.values():
            book = Leases(self.results, flight.token)
            for rid, gen in flight.gens.items():
                try:
                    book.release(Lease(rid, gen, flight.token))
                except OSError:
                    pass  # it expires on its own

    def tick(self) -> None:
        if self.inflight or self.held:
            self.bar.set_postfix_str(f"{len(self.inflight)} unit(s) out, {len(self.held)} run(s) held by other commands"[:60])


def train_job(
    name: str,
    runs: Sequence[RunConfig],
    results: Results,
    data: DataSource,
    ledger: RunLedger,
    cluster: Any,
    *,
    cpus: float,
    gpus: float | None,
    pack: int | None,
    retries: int,
    compile_step: bool | str,
    echo: Echo,
) -> tuple[RunLedger, str]:
    """Train the runs the ledger says are not done, a pack per Ray task on the executor. Returns the
    ledger after, and why some runs failed ("" when none did): a run that diverged or kept failing
    does not stop the others, nor their evaluation and report (the command exits 1 at the end)."""
    from pipeline.ray_backend import executor
    from pipeline.ray_backend.resources import Resources

    todo = ledger.todo(runs)
    if not todo:
        echo(f"{name}: {len(runs)} runs (0 to train); results in {results}")
        return ledger, ""
    res = Resources(cpus, cluster.default_gpus(gpus))
    cluster.check_resources(res)  # before the first line: a request no node meets is one error line
    echo(f"{name}: {len(runs)} runs ({len(todo)} to train); each training task gets {res}; results in {results}")
    packs = pack_runs(todo, pack, res.gpus)
    b = bar(len(runs), f"{name}: training", "run")
    b.update(len(runs) - len(todo))
    source = Training(results, data, packs, pack if pack is not None else (16 if res.gpus > 0 else 1), compile_step, lambda m: b.write(m, file=sys.stderr), b)
    failed = ""
    try:
        executor.run(cluster, source, res, what="training", retries=retries, notice=lambda m: b.write(m, file=sys.stderr))
    except executor.UnitsFailed as e:
        failed = str(e)
    finally:
        b.close()
    if source.failures and not failed:  # members that diverged inside packs that finished: named like any failure
        names = list(source.failures)
        named = ", ".join(f"run {r}" for r in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        failed = f"training of {named} failed ({source.failures[names[0]]}); the others are kept; run the same command again to retry from the last checkpoints"
    return ledger.with_done(source.trained + source.by_others), failed


def eval_plans(job: Any, dataset: str, test_images: int | None, train_images: int | None) -> list[EvalPlan]:
    """The job's estimates on one dataset: L_k of the test images, of the pruned models on the same
    images and draws (when the job asks), and of the first training images (the train-test gap)."""
    plans = []
    for images, n, pruned in job.eval_sizes(dataset, test_images, train_images):
        plans.append(EvalPlan(job.eval, num_images=n, images=images))
        if pruned:
            plans.append(EvalPlan(job.eval, num_images=n, images=images, pruned=True))
    return plans


def units_of(spans: Sequence[Span], fn: Any, args: Callable[[list[Span]], tuple[Any, ...]], per_unit: int) -> list[Any]:
    """Scoring units: up to ``per_unit`` consecutive ranges of one run each (a worker loads the run's
    model once per unit), never two runs in one unit."""
    from pipeline.ray_backend.executor import Unit

    out: list[list[Span]] = []
    group: list[Span] = []
    for span in spans:
        if group and (len(group) == per_unit or group[0].run_id != span.run_id):
            out.append(group)
            group = []
        group.append(span)
    if group:
        out.append(group)
    return [Unit(str(g[0]) if len(g) == 1 else f"{g[0]} .. {g[-1].last}", fn, args(g)) for g in out]


def per_unit(ranges: int, slots: int) -> int:
    """Ranges per scoring unit: enough units to keep every slot busy four times over, at most 8 ranges each."""
    return max(1, min(8, ranges // max(1, 4 * slots)))


def evaluate_job(
    job: Any,
    results: Results,
    data: DataSource,
    ledger: RunLedger,
    cluster: Any,
    *,
    test_images: int | None = None,
    train_images: int | None = None,
    workers: int | None = None,
    cpus: float = 1.0,
    gpus: float | None = None,
    retries: int = 3,
    ais: AISPlan | None = None,
) -> None:
    """The job's k=5000 evaluation of its done runs on the executor: the test images (and the pruned
    models), then the training images if asked. Each dataset is sized on its own. With ``ais``, that
    AIS (or BDMC) evaluation instead (:mod:`iwae.ais`), in ranges and written the same way. A range
    that fails does not stop the others, nor the other estimates: :class:`UnitsFailed` names them all
    at the end."""
    from pipeline.ray_backend import executor
    from pipeline.ray_backend.resources import Resources
    from pipeline.work import score_unit

    res: Resources | None = None  # asked of the cluster when there is a range to score (a finished grid connects to none)
    failed: dict[str, str] = {}
    for dataset in job.datasets():
        run_ids = [c.run_id for c in job.runs if c.dataset == dataset and ledger.done(c.run_id)]
        plans: list[Plan] = [ais] if ais is not None else list(eval_plans(job, dataset, test_images, train_images))
        for plan in plans:
            sl = EstimateLedger(results, plan)
            b = bar(0, f"{job.name} {dataset}: {plan.table} {plan.estimate}", "range")

            def notice(line: str, b: Any = b) -> None:
                b.write(line, file=sys.stderr)

            try:
                items = sl.prepare(run_ids, notice)
                b.total = len(items)
                b.refresh()
                if not items:
                    continue
                res = res or Resources(cpus, cluster.default_gpus(gpus))
                size = per_unit(len(items), executor.slots(cluster, res))

                def args(g: list[Span], sl: EstimateLedger = sl) -> tuple[Any, ...]:
                    return (sl, data, g)

                def done(unit: Any, n: int, b: Any = b) -> None:
                    b.update(len(unit.args[2]))

                units = units_of(items, score_unit, args, size)
                source = executor.Ready(results, units, done)
                executor.run(cluster, source, res, what="evaluation", workers=workers, retries=retries, notice=notice)
            except executor.UnitsFailed as e:  # named once, with every other failure, at the end
                failed.update(e.failed)
            finally:
                b.close()
    if failed:
        names = list(failed)
        named = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise executor.UnitsFailed(f"evaluation of {named} failed ({failed[names[0]]}); the rest is written; run the same command again to finish", failed)


def evaluate_here(results: Results, data: DataSource, run_ids: Sequence[str], plan: Plan, notice: Echo | None = None, show: bool = True) -> int:
    """One evaluation plan scored in this process (no Ray): the `train` and `repro` commands. Returns rows."""
    from pipeline.work import score_here

    sl = EstimateLedger(results, plan)
    items = sl.prepare(run_ids, notice)
    b = bar(len(items), f"{plan.table} {plan.estimate}", "range") if show else None
    try:
        return score_here(sl, data, items, progress=b.update if b is not None else None)
    finally:
        if b is not None:
            b.close()


def score_first_images(results: Results, data: DataSource, run_ids: Sequence[str], k: int, n: int) -> str:
    """The `train` command's evaluation: the first ``n`` test images at k, in the ranges every other
    command writes (a sweep of the same runs reuses them). Returns the estimate's name."""
    plan = EvalPlan(EvalConfig(k=k), num_images=n)
    evaluate_here(results, data, run_ids, plan)
    return plan.estimate


def score_model(
    ref: Any,
    data_spec: str,
    results: Results,
    data: DataSource,
    cluster: Any,
    plan: Plan,
    *,
    binarize: bool,
    likelihood: str,
    images: Any,
    cpus: float,
    gpus: float | None,
    workers: int | None,
    retries: int,
    echo: Echo,
) -> int:
    """`score`: a user's model (:class:`pipeline.user_models.ModelRef`) through the executor, in the
    ranges every evaluation uses, under its key (name and weights digest). ``images``: the rows of a
    user's data file (they travel with each range), or None for MNIST's test images on the nodes.
    Writes the model's row once; returns the estimate rows written."""
    import json

    from pipeline.ray_backend import executor
    from pipeline.ray_backend.resources import Resources
    from pipeline.store.results import versions
    from pipeline.user_models import row_fields, score_user_unit

    if results.run_row(ref.key) is None:
        row = {
            **row_fields(ref),
            "label": ref.name,
            "status": "done",
            "error": "",
            "scored_model": ref.factory,
            "likelihood": likelihood,
            "config": json.dumps({"factory": ref.factory, "name": ref.name, "digest": ref.digest, "data": data_spec, "binarize": binarize}, sort_keys=True),
            **versions(),
        }
        results.write_rows(results.row_key(ref.key), [row], "runs")
    sl = EstimateLedger(results, plan)
    items = sl.prepare([ref.key], echo)
    if not items:
        return 0
    res = Resources(cpus, cluster.default_gpus(gpus))
    b = bar(len(items), f"{ref.name}: {plan.table} {plan.estimate}", "range")
    size = per_unit(len(items), executor.slots(cluster, res))

    def args(g: list[Span]) -> tuple[Any, ...]:
        return (sl, data, ref, binarize, g, None if images is None else [images[s.first : s.last + 1] for s in g])

    units = units_of(items, score_user_unit, args, size)
    rows = [0]

    def done(unit: Any, n: int) -> None:
        rows[0] += n
        b.update(len(unit.args[4]))

    try:
        executor.run(cluster, executor.Ready(results, units, done), res, what="scoring", workers=workers, retries=retries, notice=echo)
    finally:
        b.close()
    return rows[0]
