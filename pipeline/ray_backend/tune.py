"""Ray Tune: one trial per pack of runs, retried from its checkpoints in the store, resumable."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from iwae.config import RunConfig
from pipeline.datasource import DataSource
from pipeline.errors import RunFailed, UserError
from pipeline.ledger import RunLedger
from pipeline.ray_backend.cluster import Resources, check_resources, interrupt_guard, storage_fix, storage_usable_here
from pipeline.results import Results
from pipeline.storage import Store
from pipeline.work import mark_failed, train_members


def _trainable(config: dict[str, Any], results: Results | None = None, data: DataSource | None = None) -> None:
    """One Tune trial = one pack of runs (often a pack of one, see :mod:`iwae.pack`). On a retry (any
    node) each member resumes from its own checkpoints in the store; members already done are kept.

    ``results`` and ``data`` come through ``tune.with_parameters`` (the objects the command made,
    put once into Ray's object store, not deep-copied into every trial's config); an experiment
    saved before that carries their locations in its config instead."""
    import torch
    from ray import tune

    cfgs = [RunConfig.from_dict(d) for d in _members(config)]
    if results is None or data is None:
        results, data = Results(Store.open(config["results"])), DataSource.open(config["data_dir"])
    why = storage_usable_here(results)  # a node that joined after the driver's check_storage (an autoscaler's) is checked here
    if why:
        raise UserError(f"node {socket.gethostname()} cannot use {results} ({why}); {storage_fix(results)}")
    threads = int(config.get("threads") or 0)
    if threads:
        torch.set_num_threads(threads)

    def report(row: dict[str, Any]) -> None:
        tune.report({k: v for k, v in row.items() if isinstance(v, (int, float))})

    rows = train_members(cfgs, results, data, on_epoch=lambda cfg, row: report(row), compile_step=config.get("compile", "auto"))
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


def _interrupt_callback() -> Any:
    """A Tune callback that re-raises a Ctrl-C some frame swallowed, at the next step of Tune's loop."""
    from ray import tune

    class InterruptCallback(tune.Callback):
        def on_step_begin(self, iteration, trials, **info):  # type: ignore[no-untyped-def]
            from pipeline.ray_backend import cluster  # by import: the callback is pickled with Tune's state

            if cluster.INTERRUPTED.is_set():
                raise KeyboardInterrupt

    return InterruptCallback()


def train_runs(
    name: str,
    runs: Sequence[RunConfig],
    todo: Sequence[RunConfig],
    results: Results,
    data: DataSource,
    res: Resources,
    *,
    max_failures: int = 2,
    progress: Callable[[str, int, int], None] | None = None,
    compile_step: bool | str = "auto",
    pack: int | None = 1,
) -> list[str]:
    """Train the runs ``todo`` (those of ``runs``, the sweep's selection, that the run ledger found
    not done) as Tune trials; returns their ids once all are done. Raises RunFailed naming the runs
    that failed (their rows say so).

    The experiment is named by the sweep's whole selection (and pack size), not by what is left to
    train, so re-running the same command after a driver crash at any point restores it with
    ``Tuner.restore``: finished trials stay finished, the others resume, each from its last epoch's
    checkpoint in the store, on whichever node it lands. Once every run is done the experiment's
    folder is removed: it exists only to resume, and dead experiments do not pile up under ``tune/``.
    """
    from ray import tune

    if not todo:
        return []
    check_resources(res)
    # Tune's new console output prints a configuration box even at verbose=0; ours is the progress bar
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ctrl-C: Tune's own handler would end every running trial as failed and advise Tuner.restore;
    # without it the interrupt reaches the CLI, which keeps what is finished and says to re-run
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    trials = pack_runs(todo, pack, res.gpus)
    digest = hashlib.sha256(",".join(sorted("+".join(c.run_id for c in t) for t in pack_runs(runs, pack, res.gpus))).encode()).hexdigest()[:8]
    exp_name = f"{name}-{digest}"
    storage_path, storage_fs = _tune_storage(results)
    exp_path = f"{storage_path}/{exp_name}"
    trainable = tune.with_resources(tune.with_parameters(_trainable, results=results, data=data), {"cpu": res.cpus, "gpu": res.gpus})
    by_id = {c.run_id: c for c in todo}
    callbacks: list[Any] = [_interrupt_callback()] + ([_progress_callback(progress, len(todo))] if progress else [])
    tuner = None
    if tune.Tuner.can_restore(exp_path, storage_filesystem=storage_fs):
        try:
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=storage_fs)
            sys.stderr.write(f"resuming Tune's experiment {exp_name}: finished trials are kept, the others resume from their checkpoints\n")
        except Exception as e:  # noqa: BLE001  # a saved state this code cannot load: the runs' own checkpoints still resume them
            why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            sys.stderr.write(f"note: Tune could not restore {exp_name} ({why}); each run resumes from its checkpoints in a new experiment\n")
            exp_name = f"{exp_name}-{uuid.uuid4().hex[:6]}"
    if tuner is None:
        space = {
            "pack": tune.grid_search([[c.to_dict() for c in t] for t in trials]),
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
    after = RunLedger.read(results, by_id)  # what the trials left in the store: the one definition of done
    for i in range(len(grid)):
        r = grid[i]
        members = [RunConfig.from_dict(d) for d in _members(r.config)] if r.config else []
        for cfg in members:
            if r.error is not None and not after.done(cfg.run_id) and mark_failed(results, cfg, str(r.error)):
                failed[cfg.run_id] = str(r.error).strip().splitlines()[-1][:160]
    for rid in by_id:
        if rid not in failed and not after.done(rid) and mark_failed(results, by_id[rid], "trial did not finish"):
            failed[rid] = "trial did not finish"
    if not failed:
        results.store.delete_dir(f"{results.tune_key}/{exp_name}")  # only for resuming; every run is done
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
