"""Units of work, free of Ray: train one run, evaluate one shard. Tune trials and actors call these.

They only call into :mod:`iwae` for the science and into :mod:`pipeline.results` for storage, and
are idempotent: a finished run or a written shard is never redone, so retries and re-runs are safe.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iwae import checkpoint
from iwae.config import RunConfig
from iwae.data import Dataset, load_dataset
from iwae.evaluate import EvalConfig, binarize_by_id, estimate_log_px, warm_up
from iwae.models import IWAEModel
from iwae.train import FINAL, load_model, pick_device, train
from iwae.units import active_masks, prune, unit_variances
from pipeline.errors import UserError
from pipeline.results import EVAL_SCHEMA, PREFIXES, RUNS_SCHEMA, TRAIN_SCHEMA, Results, versions, write_json_atomic, write_table_atomic


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run_complete(results: Results, run_id: str) -> bool:
    """Done = its row says done *and* its final checkpoint reads (a truncated one is redone)."""
    if not results.run_done(run_id):
        return False
    try:
        checkpoint.load(results.run_dir(run_id) / FINAL)
    except checkpoint.CheckpointError:
        return False
    return True


def init_checkpoint(results: Results, cfg: RunConfig) -> dict[str, Any] | None:
    """The final checkpoint of ``cfg.init_from`` (Table 2 starts from Table 1's models)."""
    if not cfg.init_from:
        return None
    path = results.run_dir(cfg.init_from) / FINAL
    if not path.exists():
        raise UserError(f"run {cfg.init_from} (the starting point of {cfg.run_id}) is not trained; run its job first (see `iwae-pipeline jobs`)")
    return checkpoint.load(path)


def train_run(
    cfg: RunConfig,
    results: Results,
    data_dir: Path,
    *,
    device: str | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    data: Dataset | None = None,
    compile_step: bool | str = "auto",
) -> dict[str, Any]:
    """Train ``cfg`` (resuming from its checkpoints), measure active units, write its tables.

    Returns the run's row. A run already marked done is returned as it is, without training.
    """
    row = results.run_row(cfg.run_id)
    if row is not None and row["status"] == "done" and run_complete(results, cfg.run_id):
        return row
    data = data or load_dataset(cfg.dataset, data_dir, cfg.split)
    init = init_checkpoint(results, cfg)
    dev = pick_device(device)
    res = train(cfg, data, results.run_dir(cfg.run_id), device=dev, init=init, on_epoch=on_epoch, compile_step=compile_step)
    train_x = data.train[: cfg.train_subset] if cfg.train_subset else data.train
    variances = unit_variances(res.model, torch.as_tensor(train_x[: cfg.num_active_examples]))
    masks = active_masks(variances)
    hist = [{"run_id": cfg.run_id, **h} for h in res.history]
    write_table_atomic(hist, TRAIN_SCHEMA, results.train_path(cfg.run_id))
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
        "finished_at": _now(),
        **versions(),
    }
    write_table_atomic([row], RUNS_SCHEMA, results.runs_path(cfg.run_id))
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
    write_table_atomic([row], RUNS_SCHEMA, results.runs_path(cfg.run_id))


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

    def shard_ids(self, shard: int) -> np.ndarray:
        return np.array_split(np.arange(self.num_images), self.shards)[shard]

    def identity(self) -> dict[str, Any]:
        return {"k": self.eval.k, "seed": self.eval.seed, "block": self.eval.block, "num_images": self.num_images, "shards": self.shards, "pruned": self.pruned}


def shard_path(results: Results, run_id: str, shard: int, shards: int, table: str = "eval") -> Path:
    return results.eval_dir(run_id, table) / f"shard-{shard:05d}-of-{shards:05d}.parquet"


def _covers(old: dict[str, Any], plan: EvalPlan, finished: Callable[[], bool]) -> bool:
    """A finished evaluation with the same estimator settings on at least these images (and a pruned
    pass if this plan wants one) stands for this plan: a run shared by two jobs is scored once."""
    new = plan.identity()
    same = all(old.get(k) == new[k] for k in ("k", "seed", "block"))
    return same and old.get("num_images", 0) >= plan.num_images and (old.get("pruned", False) or not plan.pruned) and finished()


def prepare_eval(results: Results, run_id: str, plan: EvalPlan) -> list[int]:
    """Check (or record) the evaluation's identity for a run; return the shards still to do."""
    meta = results.eval_dir(run_id, plan.table) / "_eval.json"
    if meta.exists():
        old, new = json.loads(meta.read_text()), plan.identity()
        if old != new:
            n_old = int(old.get("shards", 0))
            if _covers(old, plan, lambda: all(shard_path(results, run_id, s, n_old, plan.table).exists() for s in range(n_old))):
                return []
            diff = ", ".join(f"{k}={old.get(k)}" for k in new if old.get(k) != new[k])
            raise UserError(f"run {run_id} was evaluated with {diff}; use the same options, or a new --results folder")
    else:
        write_json_atomic(plan.identity(), meta)
    return [s for s in range(plan.shards) if not shard_path(results, run_id, s, plan.shards, plan.table).exists()]


class ShardEvaluator:
    """Loads a run's model once (and its pruned version) and evaluates shards of the test set."""

    def __init__(self, results: Results, data_dir: Path, plan: EvalPlan, device: str | None = None, threads: int | None = None):
        self.results, self.data_dir, self.plan = results, data_dir, plan
        self.device = pick_device(device)
        if threads:
            torch.set_num_threads(threads)
        self._run_id: str | None = None
        self._models: tuple[IWAEModel, IWAEModel | None, RunConfig] | None = None
        self._images: dict[tuple[str, str, int], np.ndarray] = {}

    def _load(self, run_id: str) -> tuple[IWAEModel, IWAEModel | None, RunConfig]:
        if self._run_id != run_id or self._models is None:
            model, cfg, _ = load_model(self.results.run_dir(run_id) / FINAL, self.device)
            pruned = None
            row = self.results.run_row(run_id)
            if self.plan.pruned and row is not None and row["unit_var_h1"] is not None:
                variances = [torch.tensor(row["unit_var_h1"])] + ([torch.tensor(row["unit_var_h2"])] if row["unit_var_h2"] is not None else [])
                masks = active_masks(variances)
                if all(m.all() for m in masks):
                    pruned = model  # every unit active: pruning changes nothing, skip the second pass
                else:
                    pruned = prune(model, masks) if all(m.any() for m in masks) else None
            self._run_id, self._models = run_id, (model, pruned, cfg)
        return self._models

    def warmup(self, run_id: str) -> None:
        """Load ``run_id`` and compile the scorer for this plan's shard shape (part of start-up)."""
        model, _, _ = self._load(run_id)
        warm_up(model, self.plan.eval, len(self.plan.shard_ids(0)))

    def _plan_images(self, cfg: RunConfig) -> np.ndarray:
        """The test set, or the training images the run was trained on (its subset, if any)."""
        key = (cfg.dataset, cfg.split, int(cfg.train_subset or 0) if self.plan.images == "train" else 0)
        if key not in self._images:
            ds = load_dataset(cfg.dataset, self.data_dir, cfg.split)
            self._images[key] = ds.test if self.plan.images == "test" else ds.train[: cfg.train_subset or None]
        return self._images[key]

    def run(self, run_id: str, shard: int) -> tuple[str, int, int]:
        """Evaluate one shard and write its Parquet file (skipped if it exists). Returns (run, shard, rows)."""
        path = shard_path(self.results, run_id, shard, self.plan.shards, self.plan.table)
        if path.exists():
            return run_id, shard, 0
        model, pruned, cfg = self._load(run_id)
        test = self._plan_images(cfg)
        if self.plan.num_images > len(test):
            raise UserError(f"--{self.plan.images}-images {self.plan.num_images} exceeds the {len(test)} {self.plan.images} images of run {run_id}")
        ids = self.plan.shard_ids(shard)
        x = binarize_by_id(torch.as_tensor(test[ids]), ids.tolist(), self.plan.eval.seed)
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
        fault = os.environ.get("IWAE_FAULT_SLEEP_BEFORE_WRITE")  # test hook: widen the window for a kill
        if fault:
            import time

            time.sleep(float(fault))
        write_table_atomic(rows, EVAL_SCHEMA, path)
        return run_id, shard, len(rows)


def evaluate_local(results: Results, data_dir: Path, run_ids: Sequence[str], plan: EvalPlan, progress: Callable[[int], None] | None = None) -> int:
    """Evaluate in this process (no Ray): the `train` command and notebooks use this."""
    ev = ShardEvaluator(results, data_dir, plan)
    rows = 0
    for run_id in run_ids:
        for shard in prepare_eval(results, run_id, plan):
            rows += ev.run(run_id, shard)[2]
            if progress:
                progress(1)
    return rows
