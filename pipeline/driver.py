"""Between the CLI and the backends: the steps of a command, each taking the objects it made once.

The CLI parses options, makes the :class:`~pipeline.results.Results` and the
:class:`~pipeline.datasource.DataSource` once, and calls these steps in order:

1. :func:`ray_session`: connect (the embedded local Ray, or a cluster) before any location is
   created (``sweep``); ``evaluate``, which never creates one, reads its ledger first.
2. :func:`survey_runs`: read the job's run ledger once and repair what does not read whole; every
   later step consults that ledger.
3. :func:`check_storage`: every node can use the results location.
4. :func:`train_job`: train what the ledger says is not done (Tune trials), returning the new ledger.
5. :func:`evaluate_job`: per dataset and image set, the job's estimates (:mod:`pipeline.estimates`),
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
from pipeline.estimates import AISPlan, EvalPlan, Plan
from pipeline.ledger import EstimateLedger, RunLedger, repair
from pipeline.results import Results

Echo = Callable[[str], None]


def bar(total: int, desc: str, unit: str) -> Any:
    """A progress bar on stderr (tqdm; hidden when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=None)


def on_local_ray(address: str | None) -> bool:
    """Whether this command runs on the embedded local Ray (no address given or in the environment)."""
    return not (address or os.environ.get("RAY_ADDRESS"))


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Connected to Ray for the block; a connection this opened is closed after it."""
    from pipeline.ray_backend import cluster

    owned = cluster.connect(address)
    try:
        yield
    finally:
        if owned:
            cluster.shutdown()


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


def check_storage(results: Results) -> None:
    """Every node can use the results location; if not, a location this command created is removed."""
    from pipeline.errors import UserError
    from pipeline.ray_backend import cluster

    try:
        cluster.check_storage(results)
    except UserError:
        results.discard_if_new()
        raise


def train_job(
    name: str,
    runs: Sequence[RunConfig],
    results: Results,
    data: DataSource,
    ledger: RunLedger,
    *,
    cpus: float,
    gpus: float | None,
    pack: int | None,
    max_failures: int,
    compile_step: bool | str,
    echo: Echo,
) -> RunLedger:
    """Train the runs the ledger says are not done as Tune trials; returns the ledger after."""
    from pipeline.ray_backend import cluster, tune

    todo = ledger.todo(runs)
    trial = cluster.Resources(cpus, cluster.default_gpus(gpus))
    if todo:
        cluster.check_resources(trial)  # before the first line: a request no node meets is one error line
    echo(f"{name}: {len(runs)} runs ({len(todo)} to train); each trial gets {trial}; results in {results}")
    b = bar(len(runs), f"{name}: trials", "trial")
    b.update(len(runs) - len(todo))
    base = b.n

    def progress(msg: str, done: int, total: int) -> None:
        b.n = base + done
        b.set_postfix_str(msg[:60])
        b.refresh()

    try:
        trained = tune.train_runs(name, runs, todo, results, data, trial, max_failures=max_failures, progress=progress, compile_step=compile_step, pack=pack)
    finally:
        b.close()
    return ledger.with_done(trained)


def eval_plans(job: Any, dataset: str, test_images: int | None, train_images: int | None) -> list[EvalPlan]:
    """The job's estimates on one dataset: L_k of the test images, of the pruned models on the same
    images and draws (when the job asks), and of the first training images (the train-test gap)."""
    plans = []
    for images, n, pruned in job.eval_sizes(dataset, test_images, train_images):
        plans.append(EvalPlan(job.eval, num_images=n, images=images))
        if pruned:
            plans.append(EvalPlan(job.eval, num_images=n, images=images, pruned=True))
    return plans


def evaluate_job(
    job: Any,
    results: Results,
    data: DataSource,
    ledger: RunLedger,
    *,
    test_images: int | None = None,
    train_images: int | None = None,
    workers: int | None = None,
    cpus: float = 1.0,
    gpus: float | None = None,
    retries: int = 3,
    ais: AISPlan | None = None,
) -> None:
    """The job's k=5000 evaluation of its done runs on Ray tasks: the test images (and the pruned
    models), then the training images if asked. Each dataset is sized on its own. With ``ais``, that
    AIS (or BDMC) evaluation instead (:mod:`iwae.ais`), in ranges and written the same way."""
    from pipeline.ray_backend import cluster, tasks

    task = cluster.Resources(cpus, cluster.default_gpus(gpus))
    for dataset in job.datasets():
        run_ids = [c.run_id for c in job.runs if c.dataset == dataset and ledger.done(c.run_id)]
        plans: list[Plan] = [ais] if ais is not None else list(eval_plans(job, dataset, test_images, train_images))
        for plan in plans:
            sl = EstimateLedger(results, plan)
            b = bar(0, f"{job.name} {dataset}: {plan.table} {plan.estimate}", "range")

            def progress(done: int, total: int, b: Any = b) -> None:  # total: the ranges still to do when it started
                b.total, b.n = total, done
                b.refresh()

            def notice(line: str, b: Any = b) -> None:
                b.write(line, file=sys.stderr)

            try:
                items = sl.prepare(run_ids, notice)
                tasks.score_ranges(sl, data, items, task, workers=workers, progress=progress, notice=notice, max_retries=retries)
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
