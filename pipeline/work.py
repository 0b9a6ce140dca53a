"""Units of work, free of Ray: train one run, score one shard. Tune trials and Ray tasks call these.

They call into :mod:`iwae` for the science and read and write through :class:`pipeline.results.Results`
(a local folder or object storage), so they run the same on any node. They are idempotent: a
finished run or a written shard is never redone, so retries and re-runs are safe.

Scoring a shard returns its rows (an Arrow table) instead of writing them: one writer, the driver,
checks each shard (row count, identity) and writes it whole, so every image lands exactly once
whichever worker or node computed it, died or retried.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from iwae import checkpoint
from iwae.config import RunConfig
from iwae.data import MNIST_NPZ, DataError, Dataset, fetch_mnist, load_dataset
from iwae.evaluate import EvalConfig, binarize_by_id, estimate_log_px
from iwae.models import IWAEModel
from iwae.train import FINAL, TrainResult, pick_device, train
from iwae.units import active_masks, prune, unit_variances
from pipeline.errors import UserError
from pipeline.results import EVAL_SCHEMA, PREFIXES, DamagedFile, Results, rows_table, versions
from pipeline.storage import Store, is_uri


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------- data


def node_cache_dir() -> Path:
    """This node's own data cache: ``$IWAE_CACHE_DIR`` or ``~/.cache/iwae-pipeline``."""
    return Path(os.environ.get("IWAE_CACHE_DIR") or Path.home() / ".cache" / "iwae-pipeline").absolute()


def _has_data(name: str, folder: Path) -> bool:
    if name == "mnist":
        return (folder / MNIST_NPZ).exists() or (folder / "train-images-idx3-ubyte").exists() or (folder / "train-images-idx3-ubyte.gz").exists()
    if name == "omniglot":
        return (folder / "chardata.mat").exists()
    return True


def data_folder(name: str, location: str | Path) -> Path:
    """A local folder holding dataset ``name`` on this node, fetched once per node if need be.

    ``location`` is the user's ``--data-dir``: a local folder, or a URI (``s3://...``) whose files
    are copied into this node's cache. A local folder that this node does not have (a multi-node
    cluster whose nodes share no disk) is replaced by the node's cache, where MNIST is fetched
    (sha256-checked) under a file lock, so that the first piece of work on a node fetches it and
    the others wait for it.
    """
    from filelock import FileLock

    if not is_uri(location) and _has_data(name, Path(location)):
        return Path(location).absolute()
    cache = node_cache_dir()
    if is_uri(location):
        cache = cache / hashlib.sha256(str(location).encode()).hexdigest()[:12]
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / "_fetch.lock"), timeout=1800):
        if _has_data(name, cache):
            return cache
        if is_uri(location):
            store = Store.open(str(location))
            for fname in (MNIST_NPZ,) if name == "mnist" else ("chardata.mat",):
                try:
                    (cache / f"_{fname}").write_bytes(store.read_bytes(fname))
                except FileNotFoundError:
                    raise DataError(f"{store.uri(fname)} not found; copy {fname} there or pass a local --data-dir") from None
                os.replace(cache / f"_{fname}", cache / fname)
        elif name == "mnist":
            fetch_mnist(cache)
        else:
            raise DataError(
                f"{name} is not in {location} on node {os.uname().nodename}; copy it there, or put it in object storage and pass --data-dir s3://..."
            )
    return cache


_DATA: dict[tuple[str, str, str], Dataset] = {}


def load_data(name: str, location: str | Path, split: str = "paper") -> Dataset:
    """The dataset, loaded once per process (workers reuse it across trials and shards)."""
    key = (name, str(location), split)
    if key not in _DATA:
        _DATA.clear()  # one dataset at a time: bounded memory
        _DATA[key] = load_dataset(name, data_folder(name, location), split)
    return _DATA[key]


# ---------------------------------------------------------------------------------------- training


class StoreCheckpoints:
    """A run's checkpoints in the results store (``runs/<run_id>/*.pt``), on any node."""

    def __init__(self, results: Results, run_id: str):
        self.store, self.prefix = results.store, results.run_key(run_id)

    def read(self, name: str) -> bytes | None:
        try:
            return self.store.read_bytes(f"{self.prefix}/{name}")
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        self.store.write_bytes(f"{self.prefix}/{name}", data)

    def names(self) -> list[str]:
        return [k.rsplit("/", 1)[-1] for k in self.store.list(self.prefix, ".pt")]

    def quarantine(self, name: str) -> None:
        self.store.quarantine(f"{self.prefix}/{name}")


def load_final(results: Results, run_id: str) -> dict[str, Any]:
    """A run's final checkpoint from the store (``CheckpointError`` if missing or damaged)."""
    data = StoreCheckpoints(results, run_id).read(FINAL)
    if data is None:
        raise checkpoint.CheckpointError(f"run {run_id} has no final checkpoint in {results}; train it first (`iwae-pipeline sweep JOB`)")
    return checkpoint.from_bytes(data, results.store.uri(f"{results.run_key(run_id)}/{FINAL}"))


def run_complete(results: Results, run_id: str) -> bool:
    """Done = its row reads and says done, its training history reads, and its final checkpoint
    reads. A damaged row or history is moved aside (kept) and the run is redone, not trusted."""
    if not results.run_done(run_id):
        return False
    key = results.train_key(run_id)
    try:
        results.read_file(key, "train")
    except FileNotFoundError:
        return False
    except DamagedFile:
        results.store.quarantine(key)
        return False
    try:
        load_final(results, run_id)
    except checkpoint.CheckpointError:
        return False
    return True


def completed_row(results: Results, cfg: RunConfig) -> dict[str, Any] | None:
    """The run's row when the run is complete (:func:`run_complete`), else ``None``: train it."""
    row = results.run_row(cfg.run_id)
    return row if row is not None and row["status"] == "done" and run_complete(results, cfg.run_id) else None


def init_checkpoint(results: Results, cfg: RunConfig) -> dict[str, Any] | None:
    """The final checkpoint of ``cfg.init_from`` (Table 2 starts from Table 1's models)."""
    if not cfg.init_from:
        return None
    try:
        return load_final(results, cfg.init_from)
    except checkpoint.CheckpointError:
        raise UserError(f"run {cfg.init_from} (the starting point of {cfg.run_id}) is not trained; run its job first (see `iwae-pipeline jobs`)") from None


def train_run(
    cfg: RunConfig,
    results: Results,
    data_dir: str | Path,
    *,
    device: str | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    data: Dataset | None = None,
    compile_step: bool | str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``cfg`` (resuming from its checkpoints in the store), measure active units, write its rows.

    Returns the run's row. A run already complete is returned as it is, without training.
    """
    row = completed_row(results, cfg)
    if row is not None:
        return row
    data = data or load_data(cfg.dataset, data_dir, cfg.split)
    init = init_checkpoint(results, cfg)
    dev = pick_device(device)
    res = train(cfg, data, StoreCheckpoints(results, cfg.run_id), device=dev, init=init, on_epoch=on_epoch, compile_step=compile_step, progress=progress)
    return record_run(cfg, results, res, data, dev)


def train_pack_runs(
    cfgs: Sequence[RunConfig],
    results: Results,
    data_dir: str | Path,
    *,
    device: str | None = None,
    on_epoch: Callable[[RunConfig, dict[str, Any]], None] | None = None,
    data: Dataset | None = None,
    graph: bool = True,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train runs of one :func:`iwae.pack.pack_key` as one pack (those not complete yet) and write
    each run's rows as :func:`train_run` does, with the pack's run ids in its ``pack`` column.

    Returns each run's row in the order of ``cfgs``; a member that diverged gets a ``failed`` row
    (the others are kept) and :class:`~pipeline.errors.RunFailed` names it at the end.
    """
    from iwae.pack import train_pack
    from pipeline.errors import RunFailed

    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for c in cfgs:
        row = completed_row(results, c)
        if row is not None:
            rows[c.run_id] = row
        else:
            todo.append(c)
    if todo:
        data = data or load_data(todo[0].dataset, data_dir, todo[0].split)
        dev = pick_device(device)
        inits = [init_checkpoint(results, c) for c in todo]
        sinks: list[checkpoint.Checkpoints | None] = [StoreCheckpoints(results, c.run_id) for c in todo]
        hook = (lambda g, row: on_epoch(todo[g], row)) if on_epoch is not None else None
        out = train_pack(todo, data, sinks, device=dev, inits=inits, on_epoch=hook, graph=graph, progress=progress)
        pack = "+".join(c.run_id for c in todo) if len(todo) > 1 else ""
        failed = []
        for c, r in zip(todo, out):
            if isinstance(r, Exception):
                mark_failed(results, c, str(r))
                failed.append(f"{c.run_id} ({r})")
                continue
            rows[c.run_id] = record_run(c, results, r, data, dev, pack)
        if failed:
            raise RunFailed(f"{len(failed)} of {len(todo)} packed runs failed: {'; '.join(failed)}; the others are kept, run the same command again to retry")
    return [rows[c.run_id] for c in cfgs]


def train_members(
    cfgs: Sequence[RunConfig],
    results: Results,
    data_dir: str | Path,
    *,
    on_epoch: Callable[[RunConfig, dict[str, Any]], None] | None = None,
    data: Dataset | None = None,
    compile_step: bool | str = "auto",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train ``cfgs``, one pack key (a Tune trial, or a pack of ``train``): one run through
    :func:`train_run` (its own loop, compiled where that pays), several as one pack."""
    if len(cfgs) == 1:
        hook = (lambda row: on_epoch(cfgs[0], row)) if on_epoch is not None else None
        return [train_run(cfgs[0], results, data_dir, on_epoch=hook, data=data, compile_step=compile_step, progress=progress)]
    return train_pack_runs(cfgs, results, data_dir, on_epoch=on_epoch, data=data, progress=progress)


def train_in_process(
    cfgs: Sequence[RunConfig],
    results: Results,
    data_dir: str | Path,
    *,
    pack_limit: int | None,
    compile_step: bool | str = "auto",
    notice: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``cfgs`` in this process, in packs of one key: at most ``pack_limit`` runs each, or, with
    ``None``, as many as :func:`iwae.pack.auto_pack_size` finds worth it on this device. Rows in order."""
    from iwae.pack import auto_pack_size, group_packs
    from iwae.train import training_images

    dev = pick_device()
    rows: dict[str, dict[str, Any]] = {}
    for group in group_packs(cfgs, 1 << 30):
        data = load_data(group[0].dataset, data_dir, group[0].split)
        size = pack_limit if pack_limit is not None else auto_pack_size(group, training_images(group[0], data, dev))
        for members in group_packs(group, size):
            if len(members) > 1 and notice is not None:
                notice(f"training {len(members)} runs as one pack on {dev}")
            for c, row in zip(members, train_members(members, results, data_dir, data=data, compile_step=compile_step, progress=True)):
                rows[c.run_id] = row
    return [rows[c.run_id] for c in cfgs]


def record_run(cfg: RunConfig, results: Results, res: TrainResult, data: Dataset, dev: torch.device, pack: str = "") -> dict[str, Any]:
    """Measure a trained run's active units and write its training history and its row."""
    train_x = data.train[: cfg.train_subset] if cfg.train_subset else data.train
    variances = unit_variances(res.model, torch.as_tensor(train_x[: cfg.num_active_examples]))
    masks = active_masks(variances)
    results.write_rows(results.train_key(cfg.run_id), [{"run_id": cfg.run_id, **h} for h in res.history], "train")
    row = {
        **cfg.flat(),
        "label": cfg.label(),
        "status": "done",
        "error": "",
        "epochs_trained": len(res.history),
        "resumed_from_epoch": res.resumed_from_epoch,
        "train_seconds": res.seconds,
        "final_train_bound": res.history[-1]["train_bound"] if res.history else math.nan,
        "skipped_steps": int(sum(h["skipped_steps"] for h in res.history)),
        "active_h1": int(masks[0].sum()),
        "active_h2": int(masks[1].sum()) if len(masks) > 1 else None,
        "unit_var_h1": variances[0].tolist(),
        "unit_var_h2": variances[1].tolist() if len(variances) > 1 else None,
        "device": str(dev),
        "pack": pack,
        "finished_at": _now(),
        **versions(),
    }
    results.write_rows(results.runs_key(cfg.run_id), [row], "runs")
    return row


def mark_failed(results: Results, cfg: RunConfig, error: str) -> None:
    """Record a failed run so reports show it instead of dropping it (never over a done one)."""
    if results.run_done(cfg.run_id):
        return
    row = {
        **cfg.flat(),
        "label": cfg.label(),
        "status": "failed",
        "error": error.strip().splitlines()[-1][:500] if error.strip() else "failed",
        "finished_at": _now(),
        **versions(),
    }
    results.write_rows(results.runs_key(cfg.run_id), [row], "runs")


# ---------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalPlan:
    """What an evaluation covers: the first ``num_images`` test (or training) images, in ``shards``.

    ``images="train"`` scores the first training images instead, into the ``eval_train`` table: the
    train-test gap of the paper's appendix, where the authors ran the same k=5000 estimate on train.
    """

    eval: EvalConfig
    num_images: int
    shards: int
    pruned: bool = True
    images: str = "test"

    def __post_init__(self) -> None:
        if self.images not in ("test", "train"):
            raise ValueError(f"images must be test or train, got {self.images!r}")

    @property
    def table(self) -> str:
        return "eval" if self.images == "test" else "eval_train"

    @property
    def estimate(self) -> str:
        """The estimator's identity as a folder name: settings that change the numbers."""
        return f"k{self.eval.k}-seed{self.eval.seed}-block{self.eval.block}"

    def shard_ids(self, shard: int) -> np.ndarray:
        return np.array_split(np.arange(self.num_images), self.shards)[shard]

    def identity(self) -> dict[str, Any]:
        return {"k": self.eval.k, "seed": self.eval.seed, "block": self.eval.block, "num_images": self.num_images, "shards": self.shards, "pruned": self.pruned}


def eval_dir_key(results: Results, run_id: str, plan: EvalPlan) -> str:
    return f"{results.eval_key(run_id, plan.table)}/{plan.estimate}"


def shard_key(results: Results, run_id: str, plan: EvalPlan, shard: int) -> str:
    return f"{eval_dir_key(results, run_id, plan)}/shard-{shard:05d}-of-{plan.shards:05d}.parquet"


def shard_problem(results: Results, run_id: str, plan: EvalPlan, shard: int) -> str | None:
    """Why a written shard does not count as done (None when it reads whole and matches).

    Done means: its Parquet reads, its row count equals the shard's image count, and its rows carry
    this evaluation's identity (run, k, seed, images). ``FileNotFoundError`` when there is none.
    """
    try:
        t = results.read_file(shard_key(results, run_id, plan, shard), plan.table)
    except DamagedFile:
        return "does not read as Parquet"
    want = plan.shard_ids(shard)
    if t.num_rows != len(want):
        return f"has {t.num_rows} rows, not {len(want)}"
    d = t.select(["run_id", "eval_k", "eval_seed", "image_id"]).to_pydict()
    if set(d["run_id"]) != {run_id} or set(d["eval_k"]) != {plan.eval.k} or set(d["eval_seed"]) != {plan.eval.seed}:
        return "belongs to another evaluation"
    if sorted(d["image_id"]) != want.tolist():
        return "holds other images"
    return None


def _covers(old: dict[str, Any], plan: EvalPlan, finished: Callable[[], bool]) -> bool:
    """A finished evaluation with the same estimator on at least these images (and a pruned pass if
    this plan wants one) stands for this plan: a run shared by two jobs is scored once."""
    return old.get("num_images", 0) >= plan.num_images and (old.get("pruned", False) or not plan.pruned) and finished()


def prepare_eval(results: Results, run_id: str, plan: EvalPlan, notice: Callable[[str], None] | None = None) -> list[int]:
    """Check (or record) the evaluation's identity for a run; return the shards still to do.

    A written shard that does not read whole (truncated, empty, another evaluation's) is moved aside
    to ``_quarantine/`` (never deleted), ``notice`` is told in one line, and the shard is redone.
    """
    store = results.store
    meta = f"{eval_dir_key(results, run_id, plan)}/_eval.json"
    new = plan.identity()
    try:
        old = json.loads(store.read_bytes(meta))
    except FileNotFoundError:
        old = None
    except ValueError:
        old = None  # a damaged identity file: written again below (the shards are checked one by one)
    if old is not None and old != new:
        n_old = int(old.get("shards", 0))
        old_plan = EvalPlan(plan.eval, int(old.get("num_images", 0)), n_old, bool(old.get("pruned")), plan.images)
        if _covers(old, plan, lambda: all(_shard_ok(results, run_id, old_plan, s) for s in range(n_old))):
            return []
        diff = ", ".join(f"{k}={old.get(k)}" for k in new if old.get(k) != new[k])
        raise UserError(f"run {run_id} was evaluated with {diff}; use the same options, or a new --results location")
    if old is None:
        store.write_bytes(meta, json.dumps(new, sort_keys=True).encode())
    todo = []
    for s in range(plan.shards):
        key = shard_key(results, run_id, plan, s)
        try:
            why = shard_problem(results, run_id, plan, s)
        except FileNotFoundError:
            todo.append(s)
            continue
        if why is not None:
            where = store.quarantine(key)
            if notice:
                notice(f"{store.uri(key)} {why}: moved to {where}; redoing shard {s} of run {run_id}")
            todo.append(s)
    return todo


def _shard_ok(results: Results, run_id: str, plan: EvalPlan, shard: int) -> bool:
    try:
        return shard_problem(results, run_id, plan, shard) is None
    except FileNotFoundError:
        return False


def write_shard(results: Results, run_id: str, plan: EvalPlan, shard: int, table: pa.Table) -> int:
    """The one writer: check a scored shard and write it whole. Returns the rows written."""
    want = len(plan.shard_ids(shard))
    ids = table.column("image_id").to_pylist()
    if table.num_rows != want or sorted(ids) != plan.shard_ids(shard).tolist():
        raise RuntimeError(f"shard {shard} of run {run_id} came back with {table.num_rows} rows, expected {want}")
    results.store.write_table(shard_key(results, run_id, plan, shard), table.cast(EVAL_SCHEMA))
    return table.num_rows


class ShardScorer:
    """Loads a run's model once (and its pruned version) and scores shards of its images.

    One per worker process (see :func:`scorer`): consecutive shards of a run reuse the loaded model.
    """

    def __init__(self, results: Results, data_dir: str | Path, plan: EvalPlan, device: str | None = None):
        self.results, self.data_dir, self.plan = results, data_dir, plan
        self.device = pick_device(device)
        self._run_id: str | None = None
        self._models: tuple[IWAEModel, IWAEModel | None, RunConfig] | None = None

    def _load(self, run_id: str) -> tuple[IWAEModel, IWAEModel | None, RunConfig]:
        if self._run_id != run_id or self._models is None:
            ck = load_final(self.results, run_id)
            cfg = RunConfig.from_dict(ck["config"])
            model = IWAEModel(cfg.model)
            model.load_state_dict(ck["model"])
            model = model.to(self.device).eval()
            pruned: IWAEModel | None = None
            row = self.results.run_row(run_id)
            if self.plan.pruned and row is not None and row["unit_var_h1"] is not None:
                variances = [torch.tensor(row["unit_var_h1"])] + ([torch.tensor(row["unit_var_h2"])] if row["unit_var_h2"] is not None else [])
                masks = active_masks(variances)
                if all(m.all() for m in masks):
                    pruned = model  # every unit active: pruning changes nothing, skip the second pass
                elif all(m.any() for m in masks):
                    pruned = prune(model, masks)
            self._run_id, self._models = run_id, (model, pruned, cfg)
        return self._models

    def images(self, cfg: RunConfig) -> np.ndarray:
        """The test set, or the training images the run was trained on (its subset, if any)."""
        ds = load_data(cfg.dataset, self.data_dir, cfg.split)
        return ds.test if self.plan.images == "test" else ds.train[: cfg.train_subset or None]

    def score(self, run_id: str, shard: int) -> pa.Table:
        """Score one shard: its rows, one per image, as an Arrow table of the eval schema."""
        model, pruned, cfg = self._load(run_id)
        images = self.images(cfg)
        if self.plan.num_images > len(images):
            raise UserError(f"--{self.plan.images}-images {self.plan.num_images} exceeds the {len(images)} {self.plan.images} images of run {run_id}")
        ids = self.plan.shard_ids(shard)
        x = binarize_by_id(torch.as_tensor(images[ids]), ids.tolist(), self.plan.eval.seed)
        est = estimate_log_px(model, x, ids.tolist(), self.plan.eval)
        pruned_px: torch.Tensor | None
        if pruned is model:
            pruned_px = est.log_px  # no inactive unit: the pruned model is this model, the value is equal
        else:
            pruned_px = estimate_log_px(pruned, x, ids.tolist(), self.plan.eval).log_px if pruned is not None else None
        flat = cfg.flat()
        rows = []
        for j, image_id in enumerate(ids.tolist()):
            row = {**flat, "eval_k": self.plan.eval.k, "eval_seed": self.plan.eval.seed, "image_id": int(image_id), "shard": shard}
            for col in ("log_px", "ess", "khat", "mcse", "log_px_jk"):
                row[col] = float(getattr(est, col)[j])
            for c, p in enumerate(self.plan.eval.prefixes):
                if p in PREFIXES:
                    row[f"l_{p}"] = float(est.prefix[j, c])
            row["log_px_pruned"] = float(pruned_px[j]) if pruned_px is not None else None
            rows.append(row)
        return rows_table(rows, EVAL_SCHEMA)


_SCORERS: dict[tuple[str, str, EvalPlan], ShardScorer] = {}


def scorer(results: Results, data_dir: str | Path, plan: EvalPlan) -> ShardScorer:
    """This process's scorer for a plan (models and data stay loaded between shards)."""
    key = (results.location, str(data_dir), plan)
    if key not in _SCORERS:
        _SCORERS.clear()
        _SCORERS[key] = ShardScorer(results, data_dir, plan)
    return _SCORERS[key]


def evaluate_local(results: Results, data_dir: str | Path, run_ids: Sequence[str], plan: EvalPlan, progress: Callable[[int], None] | None = None) -> int:
    """Evaluate in this process (no Ray): the `train` command and notebooks use this."""
    sc = ShardScorer(results, data_dir, plan)
    rows = 0
    for run_id in run_ids:
        for shard in prepare_eval(results, run_id, plan):
            rows += write_shard(results, run_id, plan, shard, sc.score(run_id, shard))
            if progress:
                progress(1)
    return rows
