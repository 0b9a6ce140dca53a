"""Every Ray call of the project lives here (Ray's APIs move; keep them in one place).

- ``connect``: the embedded local Ray (loopback only) or an existing cluster, failing fast.
- ``sweep``: one Tune trial per grid cell, retries from stage checkpoints, resumable.
- ``evaluate``: evaluator actors over a manifest of (run, shard) items, idempotent per shard.
- ``submit``/``status``/``logs``/``stop``: Ray Jobs from a laptop.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from iwae.config import RunConfig
from pipeline.errors import RunFailed, UserError
from pipeline.results import Results
from pipeline.work import EvalPlan, ShardEvaluator, mark_failed, prepare_eval, run_complete, train_run

ENV_ADDRESS = "RAY_ADDRESS"


def _probe(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at ``address``."""
    if address in ("auto", "local"):
        return
    url = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = url.hostname, url.port or (10001 if url.scheme == "ray" else 6379)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise UserError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}); check --address, or omit it to run on a local Ray") from None


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Start the embedded local Ray (no address) or connect to ``address``/``$RAY_ADDRESS``.

    The local Ray binds to 127.0.0.1 with no dashboard: nothing listens beyond loopback.
    Returns True when this call started the connection (the caller then shuts it down).
    """
    import ray

    if address:
        _probe(address)  # even when attached already: a wrong address is always reported
    if ray.is_initialized():
        return False
    address = address or os.environ.get(ENV_ADDRESS) or None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
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
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot connect to Ray at {address} ({str(e).splitlines()[0][:120]}); check --address and RAY_AUTH_MODE") from None
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


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0


def _trainable(config: dict[str, Any]) -> None:
    """One Tune trial = one run. Resumes from the run's own stage checkpoints on a retry."""
    import torch
    from ray import tune

    cfg = RunConfig.from_dict(config["run"])
    results = Results(Path(config["results"]))
    threads = int(config.get("threads") or 0)
    if threads:
        torch.set_num_threads(threads)

    def report(row: dict[str, Any]) -> None:
        tune.report({k: v for k, v in row.items() if isinstance(v, (int, float))})

    row = train_run(cfg, results, Path(config["data_dir"]), on_epoch=report, compile_step=config.get("compile", "auto"))
    tune.report({"done": 1, "active_h1": row.get("active_h1") or 0, "final_train_bound": row.get("final_train_bound") or 0.0})


def sweep(
    name: str,
    runs: Sequence[RunConfig],
    results: Results,
    data_dir: Path,
    res: Resources,
    max_failures: int = 2,
    progress: Callable[[str, int, int], None] | None = None,
    compile_step: bool | str = "auto",
) -> list[str]:
    """Train every run not done yet as a Tune trial; returns the run ids trained. Raises RunFailed.

    Re-running the same command after a crash resumes: finished runs are skipped (their rows are
    done), Tune restores its experiment when it can, and each trial resumes from its last epoch.
    """
    from ray import tune

    todo = [c for c in runs if not run_complete(results, c.run_id)]
    if not todo:
        return []
    check_resources(res.cpus, res.gpus)
    # Tune's new console output prints a configuration box even at verbose=0; ours is the progress bar
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    digest = hashlib.sha256(",".join(sorted(c.run_id for c in todo)).encode()).hexdigest()[:8]
    exp_name = f"{name}-{digest}"
    exp_path = results.tune_dir / exp_name
    trainable = tune.with_resources(_trainable, {"cpu": res.cpus, "gpu": res.gpus})
    by_id = {c.run_id: c for c in todo}
    callbacks: list[Any] = [_progress_callback(progress, len(todo))] if progress else []
    if tune.Tuner.can_restore(str(exp_path)):
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        space = {
            "run": tune.grid_search([c.to_dict() for c in todo]),
            "results": str(results.root),
            "data_dir": str(data_dir),
            "threads": max(1, int(res.cpus)),
            "compile": compile_step,
        }
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                trial_dirname_creator=lambda t: RunConfig.from_dict(t.config["run"]).run_id,
                trial_name_creator=lambda t: RunConfig.from_dict(t.config["run"]).run_id,
            ),
            run_config=tune.RunConfig(
                name=exp_name,
                storage_path=str(results.tune_dir),
                failure_config=tune.FailureConfig(max_failures=max_failures),
                verbose=0,
                callbacks=callbacks,
            ),
        )
    grid = tuner.fit()
    failed: dict[str, str] = {}  # run id -> why
    for i in range(len(grid)):
        r = grid[i]
        cfg = RunConfig.from_dict(r.config["run"]) if r.config else None
        if r.error is not None and cfg is not None and not results.run_done(cfg.run_id):
            mark_failed(results, cfg, str(r.error))
            failed[cfg.run_id] = str(r.error).strip().splitlines()[-1][:160]
    for rid in by_id:
        if rid not in failed and not results.run_done(rid):
            mark_failed(results, by_id[rid], "trial did not finish")
            failed[rid] = "trial did not finish"
    if failed:
        raise RunFailed(f"{len(failed)} of {len(todo)} trials failed: " + "; ".join(f"{rid} ({by_id[rid].label()}): {why}" for rid, why in failed.items()))
    return list(by_id)


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
            self.done += 1
            progress("trial finished", self.done, total)

        def on_trial_error(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
            self.done += 1
            progress("trial failed", self.done, total)

    return ProgressCallback()


def evaluate(
    results: Results,
    data_dir: Path,
    run_ids: Sequence[str],
    plan: EvalPlan,
    res: Resources,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    timings: dict[str, float] | None = None,
) -> int:
    """Evaluate every (run, shard) not written yet on a pool of actors; returns rows written.

    Actors load a run's model once; a killed actor is restarted by Ray and its item retried.
    Writes are idempotent (atomic rename of a deterministic file name), so retries never double rows.
    """
    import ray
    from ray.util import ActorPool

    from iwae import checkpoint
    from iwae.train import FINAL

    items = [(rid, s) for rid in run_ids for s in prepare_eval(results, rid, plan)]
    if not items:
        return 0
    for rid in sorted({rid for rid, _ in items}):
        checkpoint.load(results.run_dir(rid) / FINAL)  # a truncated or foreign checkpoint fails here, in one line
    check_resources(res.cpus, res.gpus)
    cluster = ray.cluster_resources()
    if workers is None:
        by_cpu = int(cluster.get("CPU", 1) // max(res.cpus, 1e-9)) if res.cpus else len(items)
        by_gpu = int(cluster.get("GPU", 0) // res.gpus) if res.gpus else by_cpu
        workers = max(1, min(len(items), by_cpu, by_gpu))
    actor_cls = ray.remote(ShardEvaluator).options(num_cpus=res.cpus, num_gpus=res.gpus, max_restarts=-1, max_task_retries=3)
    actors = [actor_cls.remote(results, data_dir, plan, None, max(1, int(res.cpus))) for _ in range(workers)]
    ray.get([a.warmup.remote(items[0][0]) for a in actors])  # type: ignore[attr-defined]  # load + compile once per actor (start-up)
    t0 = time.perf_counter()
    pool = ActorPool(actors)
    rows, done = 0, 0
    # sort so consecutive items share a model: an actor reloads only when the run changes
    try:
        for _run_id, _shard, n in pool.map_unordered(lambda a, it: a.run.remote(*it), sorted(items)):
            rows += n
            done += 1
            if progress:
                progress(done, len(items))
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            raise cause from None  # bad input found inside an actor: the same one-line error
        raise RunFailed(f"evaluation failed: {str(cause or e).strip().splitlines()[-1][:200]}") from None
    if timings is not None:
        timings["work_seconds"] = time.perf_counter() - t0
    for a in actors:
        ray.kill(a)  # type: ignore[arg-type]
    return rows


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
