"""The results location: one declared Parquet schema per table, atomic writes, safe reads.

A local folder or an object-store prefix (``s3://bucket/prefix``): every read and write goes through
:class:`pipeline.store.objects.Store`. Layout (``pd.read_parquet(RESULTS + "/tables/NAME")`` reads each
table, with ``storage_options`` for object stores)::

    RESULTS/
      _iwae-pipeline.json          marker: this location is ours
      tables/runs/<run_id>.parquet one row per run: config, status, active units, wall time, versions
      tables/train/<run_id>.parquet one row per epoch: the training history
      tables/eval/run_id=<id>/estimate=<name>/images-00000-00499.parquet  one row per test image, fixed ranges
      tables/eval_train/run_id=<id>/...  the same for the first training images (the train-test gap)
      tables/ais/run_id=<id>/estimate=<name>/images-*.parquet  AIS log p(x) of the first test images (iwae.ais)
      tables/bdmc/run_id=<id>/estimate=<name>/images-*.parquet  BDMC lower/upper bounds on images simulated from the model
      runs/<run_id>/*.pt           checkpoints
      leases/<run_id>/             the run's lease generations (pipeline.store.leases)
      _quarantine/                 damaged files, moved aside (never deleted)

The estimate folders are hive-style, so ``pd.read_parquet``, DuckDB, Polars and Spark see ``run_id``
and ``estimate`` as columns; files of the earlier layout (``tables/eval/<run_id>/<estimate>/``) are
read too, and ``iwae-pipeline repair`` rewrites them into this one.
``<estimate>`` names the estimator and its settings (``k5000-seed123-block500``), and its files are
fixed image ranges (:mod:`pipeline.store.estimates`, which also holds the one reader of estimates). Every
write is whole and atomic (see :mod:`pipeline.store.objects`), so readers never see a partial file, and
rewriting a file with the same content never duplicates rows.
"""

from __future__ import annotations

import json
import platform
import shlex
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.store.objects import Store

MARKER = "_iwae-pipeline.json"
FORMAT = "iwae-pipeline/2"  # 2: MNIST pixels byte/255 and eval shards under their estimate; 1: pixels /256
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

# An estimate's files hold its figures and settings, never the run's config: the folder names the run
# and the estimate (``tables/eval/run_id=<id>/estimate=<name>/``, hive-style, so every Parquet tool sees
# them as columns), and the config is one join away, in the runs table.
EVAL_SCHEMA = pa.schema(
    [
        pa.field("eval_k", pa.int64()),
        pa.field("eval_seed", pa.int64()),
        pa.field("eval_block", pa.int64()),  # noise block size (null in earlier layouts: the folder name has it)
        pa.field("eval_pruned", pa.bool_()),  # the model with its inactive units removed, on the same draws
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("log_px", pa.float64()),
        *[pa.field(f"l_{p}", pa.float64()) for p in PREFIXES],
        pa.field("ess", pa.float64()),  # Kish effective sample size of the eval_k weights
        pa.field("khat", pa.float64()),  # PSIS Pareto k-hat; > 0.7: this image's estimate is unreliable
        pa.field("mcse", pa.float64()),  # Monte Carlo standard error of log_px (delta method), nats
        pa.field("log_px_jk", pa.float64()),  # first-order jackknife of log_px (Nowozin 2018), nats
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
        pa.field("config", pa.string()),  # the whole run config as JSON (RunConfig.to_dict)
        pa.field("cell", pa.string()),  # RunConfig.cell_id: the tables compare runs within a cell only
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
        pa.field("step_graphed", pa.bool_()),  # its training step was replayed as a CUDA graph (null before this column)
        pa.field("step_compiled", pa.bool_()),  # its training step ran torch.compile'd code
        pa.field("pack", pa.string()),  # the run ids trained with it as one pack (iwae.pack), "+"-joined; "" solo
        pa.field("scored_model", pa.string()),  # a user's model scored with `score`: its MODULE:FACTORY (null for trained runs)
        pa.field("likelihood", pa.string()),  # user models: "probability" (discrete data) or "density" (continuous: log p(x) is a log density)
        pa.field("torch_version", pa.string()),
        pa.field("ray_version", pa.string()),
        pa.field("code_version", pa.string()),
        pa.field("host", pa.string()),
        pa.field("finished_at", pa.string()),
    ]
)

AIS_SCHEMA = pa.schema(
    [
        pa.field("method", pa.string()),  # ais: test images (binarised as the k=5000 evaluation); bdmc: images simulated from the model
        pa.field("ais_steps", pa.int64()),  # T temperatures (sigmoid schedule)
        pa.field("ais_chains", pa.int64()),
        pa.field("ais_leapfrog", pa.int64()),
        pa.field("ais_seed", pa.int64()),
        pa.field("eval_seed", pa.int64()),  # the binarisation seed of the test images (ais)
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("log_px_ais", pa.float64()),  # forward AIS log p-hat: a stochastic lower bound, nats
        pa.field("log_px_upper", pa.float64()),  # bdmc: reverse AIS from the simulated latent, a stochastic upper bound
        pa.field("accept", pa.float64()),  # mean HMC acceptance of the forward chains
        pa.field("ess", pa.float64()),  # Kish ESS of the chains' final weights
        pa.field("seconds", pa.float64()),  # wall time of the range, per image
    ]
)

# what files of earlier layouts (tables/<table>/<run_id>/<estimate>/) hold beside those: the run's
# config on every row, and for L_k the pruned model's figure on its own draws (read as its own estimate)
LEGACY_COLUMNS = {
    "eval": [pa.field("run_id", pa.string()), pa.field("log_px_pruned", pa.float64()), pa.field("shard", pa.int64())],
    "ais": [pa.field("run_id", pa.string()), pa.field("shard", pa.int64())],
}

SCHEMAS = {"runs": RUNS_SCHEMA, "train": TRAIN_SCHEMA, "eval": EVAL_SCHEMA, "eval_train": EVAL_SCHEMA, "ais": AIS_SCHEMA, "bdmc": AIS_SCHEMA}
ESTIMATE_FAMILY = {"eval": "eval", "eval_train": "eval", "ais": "ais", "bdmc": "ais"}


def read_schema(name: str) -> pa.Schema:
    """What a reader asks of a file of table ``name``: its schema, and for estimates the columns of
    earlier layouts (null where a file lacks them)."""
    fam = ESTIMATE_FAMILY.get(name)
    return pa.schema([*SCHEMAS[name], *LEGACY_COLUMNS[fam]]) if fam else SCHEMAS[name]


def rows_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) as an Arrow table of ``schema``; missing columns are null."""
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


class DamagedFile(Exception):
    """A results file that was read but does not parse: proven damaged, safe to move aside."""


@dataclass(frozen=True)
class Results:
    """A results location (folder or object-store prefix). ``Results.open`` checks it is empty or ours."""

    store: Store
    created: bool = False  # this open made the location (a failed check may then remove it whole)

    @classmethod
    def open(cls, location: str, create: bool = True) -> Results:
        store = Store.open(location)
        where = store.uri()
        kind = store.kind()  # no such bucket, no credentials: one line (StoreDenied); a store that keeps failing: StoreFailing
        if kind == pafs.FileType.File:
            raise UserError(f"{where} is a file, not a results folder; pass --results with a folder path or an s3:// URI")
        ours = store.exists(MARKER)
        empty = kind == pafs.FileType.NotFound or store.is_empty()
        if not empty and not ours:
            raise UserError(f"{where} holds files not written by iwae-pipeline; pass --results with an empty or new location")
        if ours:
            try:
                fmt = json.loads(store.read_bytes(MARKER)).get("format")
            except (FileNotFoundError, ValueError):
                fmt = None
            if fmt != FORMAT:
                raise UserError(
                    f"{where} was written by an older iwae-pipeline ({fmt}: MNIST pixels /256, another layout); its numbers are not comparable,"
                    " so pass --results with a new location"
                )
        if empty and not create:
            raise UserError(f"no results in {where}; run `iwae-pipeline sweep JOB --results {shlex.quote(store.location)}` first")
        if create and not ours:
            store.write_bytes(MARKER, json.dumps({"format": FORMAT}).encode())
        res = cls(store, created=create and not ours and kind == pafs.FileType.NotFound)
        res.check_tables()
        return res

    def discard_if_new(self) -> None:
        """Undo this command's creation of the location (its marker) when it stops before any work,
        only while nothing else is there: a location is never removed once anything else has written
        to it (another command started on it meanwhile, say)."""
        if not self.created:
            return
        if self.store.list_all() != [MARKER]:
            return
        self.store.delete(MARKER)
        if self.store.is_local:
            self.store.remove_empty_dir()

    def usable_here(self) -> str:
        """On a node, at the start of work: '' when this node sees the marker the driver wrote and can
        write here, else why not, in a few words (a node that joined after the driver's check).
        Only a permanent refusal is a reason; a store that keeps failing raises
        :class:`~pipeline.store.errors.StoreFailing` (transient: the unit is tried again later)."""
        import socket
        import uuid

        from pipeline.store.errors import StoreDenied

        try:
            if not self.store.exists(MARKER):
                return "it does not see the driver's files there"
            key = f"_check/{uuid.uuid4().hex}"
            self.store.write_bytes(f"{key}/{socket.gethostname()}", b"ok")
            self.store.delete_dir(key)
            return ""
        except StoreDenied as e:  # credentials, permissions: one line
            return str(e).split(";")[0]

    def storage_fix(self) -> str:
        """What to do when a node cannot use this location."""
        fix = "pass --results s3://BUCKET/PREFIX (or gs://...)" if self.store.is_local else "give every node credentials for it (environment or IAM role)"
        return f"{fix}, or a folder all nodes share"

    def __str__(self) -> str:
        return self.store.uri()

    @property
    def location(self) -> str:
        return self.store.location

    def table_key(self, name: str) -> str:
        return f"tables/{name}"

    def checkpoint_key(self, run_id: str) -> str:
        """The folder of a run's checkpoints (``runs/<run_id>``)."""
        return f"runs/{run_id}"

    def row_key(self, run_id: str) -> str:
        """A run's row in the runs table."""
        return f"tables/runs/{run_id}.parquet"

    def history_key(self, run_id: str) -> str:
        """A run's training history (one row per epoch)."""
        return f"tables/train/{run_id}.parquet"

    def check_tables(self) -> None:
        """Refuse table folders that hold files we did not write (they would be read as data)."""
        for key in self.store.list("tables"):
            if not key.endswith(".parquet"):
                raise UserError(f"{self.store.uri(key)} is not a results file; move it out of {self.store.uri('tables')}")

    def parse(self, data: bytes, name: str, key: str) -> pa.Table:
        """One table file's bytes; ``DamagedFile`` if they do not parse as table ``name``."""
        try:
            return pq.read_table(pa.BufferReader(data), schema=read_schema(name))
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, OSError) as e:
            raise DamagedFile(f"{self.store.uri(key)} is not a valid {name} table ({type(e).__name__})") from None

    def read_file(self, key: str, name: str) -> pa.Table:
        """One table file; ``DamagedFile`` if it was read but does not parse (``FileNotFoundError`` if absent)."""
        return self.parse(self.store.read_bytes(key), name, key)

    def read(self, name: str) -> pd.DataFrame:
        """A whole table as a DataFrame (empty, with the declared columns, when there is nothing yet),
        its files read in parallel. Estimates are read by :func:`pipeline.store.estimates.read`."""
        if name not in ("runs", "train"):
            raise ValueError(f"read estimates ({name}) through pipeline.store.estimates.read")
        keys = self.store.list(self.table_key(name), ".parquet")

        def parse(key: str, data: bytes | None) -> pa.Table | None:
            return None if data is None else self.parse(data, name, key)  # None: moved aside since the listing

        try:
            tables = [t for t in self.store.read_many(keys, parse=parse) if t is not None]  # parsed as read, in parallel
        except DamagedFile as e:
            raise UserError(f"{e}; run `iwae-pipeline repair --results {shlex.quote(self.location)}` to move it aside (a re-run redoes it)") from None
        if not tables:
            return SCHEMAS[name].empty_table().to_pandas()
        return pa.concat_tables(tables).to_pandas()

    def read_row(self, run_id: str) -> dict[str, Any] | None:
        """The run's row (None when there is none); ``DamagedFile`` when it does not read whole.

        A reader: it never moves a file (:func:`pipeline.store.ledger.repair` does, before any work)."""
        try:
            rows = self.read_file(self.row_key(run_id), "runs").to_pylist()
        except FileNotFoundError:
            return None
        return rows[0] if rows else None

    def run_row(self, run_id: str) -> dict[str, Any] | None:
        """The run's row, or None when there is none or it is damaged (to be redone)."""
        try:
            return self.read_row(run_id)
        except DamagedFile:
            return None

    def write_rows(self, key: str, rows: list[dict[str, Any]], name: str) -> None:
        self.store.write_table(key, rows_table(rows, SCHEMAS[name]))


def versions() -> dict[str, str]:
    from importlib import metadata

    import torch

    try:  # read from the installed metadata: the in-process commands never import Ray
        ray_version = metadata.version("ray")
    except metadata.PackageNotFoundError:
        ray_version = ""
    from pipeline import __version__

    return {"torch_version": torch.__version__, "ray_version": ray_version, "code_version": __version__, "host": platform.node()}
