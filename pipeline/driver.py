"""Between the CLI and the backends: the steps of a command, each taking the objects it made once.

The CLI parses options, makes the :class:`~pipeline.store.results.Results` and the
:class:`~pipeline.datasource.DataSource` once, and calls these steps in order:

1. :func:`ray_session`: connect (the embedded local Ray, or a cluster) before any location is
   created (``sweep``), giving the :class:`~pipeline.ray_backend.cluster.Cluster` the later steps
   take; ``evaluate``, which never creates one, reads its ledger first.
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
from typing import Any

from iwae.config import RunConfig
from iwae.evaluate import EvalConfig
from pipeline.datasource import DataSource
from pipeline.store.estimates import AISPlan, EvalPlan, Plan
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


@contextlib.contextmanager
def ray_session(address: str | None, notice: Echo | None = None, working_dir: str | None = None) -> Iterator[Any]:
    """Connected to Ray for the block: the :class:`~pipeline.ray_backend.cluster.Cluster` the steps
    get; a connection this opened is closed after it. ``working_dir``: a folder every worker gets
    (Ray's runtime environment: a user's model module reaches the nodes so, with no shared disk)."""
    from pipeline.ray_backend import cluster

    c = cluster.connect(address, notice=notice, working_dir=working_dir)
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


def check_storage(cluster: Any, results: Results) -> None:
    """Every node can use the results location; if not, a location this command created is undone
    (only while nothing else has been written there)."""
    from pipeline.errors import UserError

    try:
        cluster.check_storage(results)
    except UserError:
        results.discard_if_new()
        raise


def pack_runs(todo: Sequence[RunConfig], pack: int | None, gpus: float) -> list[list[RunConfig]]:
    """The training units of a sweep: runs of one :func:`iwae.pack.pack_key` grouped in packs.

    ``pack`` is ``--pack``: a number is the largest pack; ``None`` (auto) packs up to 16 runs when a
    unit has a GPU (a pack of 16 k=50 models needs well under 1 GB) and none on CPU units, where
    the gain is small and machine-dependent (``iwae-pipeline bench`` measures it; ``--pack N`` asks).
    """
    from iwae.pack import group_packs

    return group_packs(list(todo), pack if pack is not None else (16 if gpus > 0 else 1))


class Training:
    """The executor's source of training units (:mod:`pipeline.ray_backend.executor`): packs of runs,
    each handed out once this command holds every member's lease (:mod:`pipeline.store.leases`).

    A run whose lease another command holds live is held back, said once, and looked at again every
    few seconds: done by the other command (dropped: trained once), or its lease expired (the other
    command died: taken over, and resumed from its checkpoints). The leases of packs in flight are
    renewed from here and from the task itself, and released when the pack's task ends."""

    def __init__(self, results: Results, data: DataSource, packs: list[list[RunConfig]], pack: int, compile_step: bool | str, echo: Echo, bar: Any):
        from pipeline.store.leases import Leases, new_owner

        self.results, self.data, self.pack, self.compile_step, self.echo, self.bar = results, data, pack, compile_step, echo, bar
        self.leases = Leases(results, new_owner())
        self.fresh = [list(p) for p in packs]  # not yet looked at
        self.held: dict[str, RunConfig] = {}  # held by another command: looked at again every few seconds
        self.told: set[str] = set()
        self.inflight: dict[str, list[Any]] = {}  # unit name -> its leases
        self.trained: list[str] = []
        self.by_others: list[str] = []
        self.failures: dict[str, str] = {}
        self.last_look = self.last_renew = self.last_show = 0.0

    def _unit(self, members: list[RunConfig], leases: list[Any]) -> Any:
        from pipeline.ray_backend.executor import Unit
        from pipeline.work import train_unit

        name = f"run {members[0].run_id}" + (f" (+{len(members) - 1})" if len(members) > 1 else "")
        self.inflight[name] = leases
        return Unit(name, train_unit, (self.results, self.data, [c.to_dict() for c in members], leases, self.compile_step))

    def take(self) -> list[Any]:
        import time

        from iwae.pack import group_packs
        from pipeline.store.leases import Held
        from pipeline.store.ledger import RunState, run_state

        candidates, self.fresh = self.fresh, []
        if self.held and time.monotonic() - self.last_look > 5.0:
            self.last_look = time.monotonic()
            for rid in list(self.held):
                try:
                    state = run_state(self.results, rid).state
                except OSError:
                    continue  # a store blip: looked at again with the others
                if state == RunState.done:  # the other command finished it
                    del self.held[rid]
                    self.by_others.append(rid)
                    self.bar.update(1)
                    self.echo(f"run {rid} was trained by the other command")
            candidates += group_packs(list(self.held.values()), self.pack)
            self.held = {}
        units = []
        for members in candidates:
            got, leases = [], []
            for c in members:
                try:
                    lease = self.leases.acquire(c.run_id)
                except OSError as e:  # the store did not answer (a blip, a raced conditional PUT): look again in a few seconds
                    self.held[c.run_id] = c
                    self.echo(f"run {c.run_id}: its lease could not be read or written ({type(e).__name__}: {str(e)[:120]}); trying again")
                    continue
                if isinstance(lease, Held):
                    self.held[c.run_id] = c
                    if c.run_id not in self.told:
                        self.told.add(c.run_id)
                        self.echo(f"run {c.run_id} is being trained by another command ({lease.by}); this one waits for it, or for its lease to expire")
                    continue
                got.append(c)
                leases.append(lease)
            if got:
                units.append(self._unit(got, leases))
        return units

    def waiting(self) -> int:
        return len(self.held)

    def _release(self, name: str) -> None:
        for lease in self.inflight.pop(name, []):
            try:
                self.leases.release(lease)
            except OSError:
                pass  # it expires on its own

    def done(self, unit: Any, rows: list[dict[str, Any]]) -> None:
        lost = [r["lease_lost"] for r in rows if "lease_lost" in r]
        if lost:  # another command took the runs over: wait for it like for any held run
            self.echo(lost[0])
            for d in unit.args[2]:
                cfg = RunConfig.from_dict(d)
                self.held[cfg.run_id] = cfg
            self.inflight.pop(unit.name, None)
            return
        self._release(unit.name)
        self.trained += [r["run_id"] for r in rows]
        self.bar.update(len(rows))

    def failed(self, unit: Any, why: str) -> None:
        from pipeline.work import mark_failed

        self._release(unit.name)
        for d in unit.args[2]:
            cfg = RunConfig.from_dict(d)
            mark_failed(self.results, cfg, why)  # reports show it; never over a done run
            self.failures[cfg.run_id] = why
        self.bar.update(len(unit.args[2]))

    def close(self) -> None:
        """Release every lease still held (a command interrupted, or stopped by an error): another
        command may take the runs over at once, from their last checkpoints."""
        for name in list(self.inflight):
            self._release(name)

    def tick(self) -> None:
        import time

        now = time.monotonic()
        if now - self.last_renew > self.leases.seconds / 3:
            self.last_renew = now
            for leases in self.inflight.values():
                for lease in leases:
                    try:
                        self.leases.renew(lease)
                    except Exception:  # noqa: BLE001  # lost or a blip: the task sees it and stops
                        pass
        if now - self.last_show > 10.0 and self.inflight:
            self.last_show = now
            shown = [lease for leases in self.inflight.values() for lease in leases][:8]  # a progress hint: a few reads, not one per run
            try:
                epochs = [self.leases.epoch(lease.run_id) or 0 for lease in shown]
            except OSError:
                return  # a store blip: the hint waits for the next tick
            self.bar.set_postfix_str(f"epochs reached: {', '.join(map(str, epochs))}"[:60])


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
) -> RunLedger:
    """Train the runs the ledger says are not done, a pack per Ray task on the executor; returns the ledger after."""
    from pipeline.ray_backend import executor
    from pipeline.ray_backend.resources import Resources

    todo = ledger.todo(runs)
    res = Resources(cpus, cluster.default_gpus(gpus))
    if todo:
        cluster.check_resources(res)  # before the first line: a request no node meets is one error line
    echo(f"{name}: {len(runs)} runs ({len(todo)} to train); each training task gets {res}; results in {results}")
    if not todo:
        return ledger
    packs = pack_runs(todo, pack, res.gpus)
    b = bar(len(runs), f"{name}: training", "run")
    b.update(len(runs) - len(todo))
    source = Training(results, data, packs, pack if pack is not None else (16 if res.gpus > 0 else 1), compile_step, lambda m: b.write(m, file=sys.stderr), b)
    try:
        executor.run(cluster, source, res, what="training", retries=retries, notice=lambda m: b.write(m, file=sys.stderr))
    finally:
        b.close()
    return ledger.with_done(source.trained + source.by_others)


def eval_plans(job: Any, dataset: str, test_images: int | None, train_images: int | None) -> list[EvalPlan]:
    """The job's estimates on one dataset: L_k of the test images, of the pruned models on the same
    images and draws (when the job asks), and of the first training images (the train-test gap)."""
    plans = []
    for images, n, pruned in job.eval_sizes(dataset, test_images, train_images):
        plans.append(EvalPlan(job.eval, num_images=n, images=images))
        if pruned:
            plans.append(EvalPlan(job.eval, num_images=n, images=images, pruned=True))
    return plans


def _writer(sl: EstimateLedger) -> Callable[[Any, Any], None]:
    """The one writer of an estimate's ranges: what the executor hands a scored range to."""

    def write(unit: Any, table: Any) -> None:
        sl.write(unit.args[2], table)

    return write


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
    AIS (or BDMC) evaluation instead (:mod:`iwae.ais`), in ranges and written the same way."""
    from pipeline.ray_backend import executor
    from pipeline.ray_backend.resources import Resources
    from pipeline.work import score_range

    res = Resources(cpus, cluster.default_gpus(gpus))
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
                units = [executor.Unit(str(span), score_range, (sl, data, span)) for span in items]
                source = executor.Ready(results, units, _writer(sl), b.update)
                executor.run(cluster, source, res, what="evaluation", workers=workers, retries=retries, notice=notice)
            finally:
                b.close()


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
    from pipeline.user_models import row_fields, score_user_range

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
    units = [
        executor.Unit(str(span), score_user_range, (sl, data, ref, binarize, span, None if images is None else images[span.first : span.last + 1]))
        for span in items
    ]
    rows = [0]

    def write(unit: Any, table: Any) -> None:
        rows[0] += sl.write(unit.args[4], table)

    try:
        executor.run(cluster, executor.Ready(results, units, write, b.update), res, what="scoring", workers=workers, retries=retries, notice=echo)
    finally:
        b.close()
    return rows[0]
