"""The results folder: one declared Parquet schema per table, atomic writes, safe reads.

Layout (``pd.read_parquet(results / "tables" / NAME)`` reads each table with no extra arguments)::

    results/
      _iwae-pipeline.json          marker: this folder is ours
      tables/runs/<run_id>.parquet one row per run: config, status, active units, wall time, versions
      tables/train/<run_id>.parquet one row per epoch: the training history
      tables/eval/<run_id>/shard-00000-of-00004.parquet  one row per test image
      tables/eval/<run_id>/_eval.json  the evaluation's identity (k, seed, images, shards)
      tables/eval_train/<run_id>/...  the same for the first training images (the train-test gap)
      runs/<run_id>/*.pt           checkpoints
      tune/                        Ray Tune's experiment state

Every file is written under a ``_``-prefixed temporary name in its final folder and renamed into
place (atomic on POSIX), so readers (which skip ``_``/``.`` names) never see a partial file, and
rewriting a file with the same content never duplicates rows.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError

MARKER = "_iwae-pipeline.json"
PREFIXES = (1, 5, 50, 500, 5000)

CONFIG_FIELDS: list[pa.Field] = [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("dataset", pa.string()),
    pa.field("split", pa.string()),
    pa.field("layers", pa.int64()),
    pa.field("latent", pa.string()),
    pa.field("objective", pa.string()),
    pa.field("k", pa.int64()),
    pa.field("m", pa.int64()),
    pa.field("beta", pa.float64()),
    pa.field("estimator", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("stages", pa.int64()),
    pa.field("epoch_scale", pa.float64()),
    pa.field("epochs", pa.int64()),
    pa.field("authors_code", pa.bool_()),
    pa.field("init_from", pa.string()),
    pa.field("train_subset", pa.int64()),
]

EVAL_SCHEMA = pa.schema(
    CONFIG_FIELDS
    + [
        pa.field("eval_k", pa.int64()),
        pa.field("eval_seed", pa.int64()),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("log_px", pa.float64()),
        *[pa.field(f"l_{p}", pa.float64()) for p in PREFIXES],
        pa.field("log_px_pruned", pa.float64()),
        pa.field("ess", pa.float64()),  # Kish effective sample size of the eval_k weights
        pa.field("khat", pa.float64()),  # PSIS Pareto k-hat; > 0.7: this image's estimate is unreliable
        pa.field("mcse", pa.float64()),  # Monte Carlo standard error of log_px (delta method), nats
        pa.field("log_px_jk", pa.float64()),  # first-order jackknife of log_px (Nowozin 2018), nats
        pa.field("shard", pa.int64()),
    ]
)

TRAIN_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("epoch", pa.int64()),
        pa.field("stage", pa.int64()),
        pa.field("lr", pa.float64()),
        pa.field("train_bound", pa.float64()),
        pa.field("grad_norm", pa.float64()),
        pa.field("skipped_steps", pa.int64()),
        pa.field("steps", pa.int64()),
        pa.field("seconds", pa.float64()),
        pa.field("examples_per_s", pa.float64()),
    ]
)

RUNS_SCHEMA = pa.schema(
    CONFIG_FIELDS
    + [
        pa.field("label", pa.string()),
        pa.field("status", pa.string()),  # done | failed
        pa.field("error", pa.string()),
        pa.field("epochs_trained", pa.int64()),
        pa.field("resumed_from_epoch", pa.int64()),  # > 0 when a retry resumed from a checkpoint
        pa.field("train_seconds", pa.float64()),
        pa.field("final_train_bound", pa.float64()),
        pa.field("skipped_steps", pa.int64()),
        pa.field("active_h1", pa.int64()),
        pa.field("active_h2", pa.int64()),
        pa.field("unit_var_h1", pa.list_(pa.float64())),
        pa.field("unit_var_h2", pa.list_(pa.float64())),
        pa.field("device", pa.string()),
        pa.field("torch_version", pa.string()),
        pa.field("ray_version", pa.string()),
        pa.field("code_version", pa.string()),
        pa.field("host", pa.string()),
        pa.field("finished_at", pa.string()),
    ]
)

SCHEMAS = {"runs": RUNS_SCHEMA, "train": TRAIN_SCHEMA, "eval": EVAL_SCHEMA, "eval_train": EVAL_SCHEMA}


def write_table_atomic(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    """Write ``rows`` with ``schema`` to ``path`` via a ``_``-prefixed temp file and ``os.replace``."""
    write_arrow_atomic(pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema), path)


def write_arrow_atomic(table: pa.Table, path: Path) -> None:
    """Write an Arrow table to ``path`` atomically (temp name starting with ``_``, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"_tmp-{uuid.uuid4().hex}.parquet"
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="_tmp-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Results:
    """A results folder. ``Results.open`` checks it is empty or ours."""

    root: Path

    @classmethod
    def open(cls, root: Path, create: bool = True) -> Results:
        root = Path(root).absolute()
        if root.exists() and not root.is_dir():
            raise UserError(f"{root} is a file, not a results folder; pass --results with a folder path")
        marker = root / MARKER
        if root.exists() and any(root.iterdir()) and not marker.exists():
            raise UserError(f"{root} holds files not written by iwae-pipeline; pass --results with an empty or new folder")
        if not root.exists() and not create:
            raise UserError(f"results folder {root} does not exist; run `iwae-pipeline sweep JOB --results {root}` first")
        if create and not marker.exists():
            write_json_atomic({"format": "iwae-pipeline/1"}, marker)
        res = cls(root)
        res.check_tables()
        return res

    def table_dir(self, name: str) -> Path:
        return self.root / "tables" / name

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def runs_path(self, run_id: str) -> Path:
        return self.table_dir("runs") / f"{run_id}.parquet"

    def train_path(self, run_id: str) -> Path:
        return self.table_dir("train") / f"{run_id}.parquet"

    def eval_dir(self, run_id: str, table: str = "eval") -> Path:
        return self.table_dir(table) / run_id

    @property
    def tune_dir(self) -> Path:
        return self.root / "tune"

    def check_tables(self) -> None:
        """Refuse table folders that hold files we did not write (they would be read as data)."""
        for name in SCHEMAS:
            d = self.table_dir(name)
            if not d.exists():
                continue
            for p in d.rglob("*"):
                if p.is_dir() or p.name.startswith(("_", ".")):
                    continue
                if p.suffix != ".parquet":
                    raise UserError(f"{p} is not a results file; move it out of {self.root / 'tables'}")

    def read(self, name: str) -> pd.DataFrame:
        """A whole table as a DataFrame (empty, with the declared columns, when there is nothing yet)."""
        schema = SCHEMAS[name]
        d = self.table_dir(name)
        files = sorted(p for p in d.rglob("*.parquet") if not p.name.startswith(("_", "."))) if d.exists() else []
        if not files:
            return schema.empty_table().to_pandas()
        try:
            tables = [pq.read_table(p, schema=schema) for p in files]
        except (pa.ArrowInvalid, OSError, ValueError) as e:
            raise UserError(f"a file in {d} is not a valid {name} table ({type(e).__name__}); move it out of the results folder") from None
        return pa.concat_tables(tables).to_pandas()

    def run_row(self, run_id: str) -> dict[str, Any] | None:
        p = self.runs_path(run_id)
        if not p.exists():
            return None
        return pq.read_table(p, schema=RUNS_SCHEMA).to_pylist()[0]

    def run_done(self, run_id: str) -> bool:
        row = self.run_row(run_id)
        return row is not None and row["status"] == "done"


def versions() -> dict[str, str]:
    import torch

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:  # pragma: no cover
        ray_version = ""
    from pipeline import __version__

    return {"torch_version": torch.__version__, "ray_version": ray_version, "code_version": __version__, "host": platform.node()}
