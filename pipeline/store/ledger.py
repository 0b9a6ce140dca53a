"""What a results location holds for a job, read once per command and decided by name: the run
ledger and the estimate ledger; and ``repair``, the one step that checks contents and moves files.

- :class:`RunLedger`: the state of each run (``absent``, ``failed``, ``incomplete``, ``done``) by the
  one definition of done (:func:`run_state`): its row says done, and its training history and final
  checkpoint *exist* (a listing or a HEAD; the 5 MB checkpoint is not downloaded to say so). For a
  job's grid the driver reads it with three listings and the rows in parallel; a task reads its own
  members' state with a request or three per run.
- :class:`EstimateLedger`: one estimate (:mod:`pipeline.store.estimates`) of the job's runs: the
  ranges written (by name, from one listing of the table), the fixed ranges left, and the one writer
  of a scored range. The local and the Ray evaluation share it and differ only in who scores.

Contents are checked where they are read: a row that does not parse is ``damaged`` (the driver
moves it aside before any work, :func:`repair`); a checkpoint that does not load names itself where
it is loaded; an estimate file that does not parse stops its reader in one line, and
:func:`check_location` (``iwae-pipeline repair``) reads every file, moves the damaged ones to
``_quarantine/`` and rewrites files of earlier layouts into the current one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import pyarrow as pa

from iwae import checkpoint
from iwae.config import RunConfig
from iwae.state import FINAL
from pipeline.store.estimates import ESTIMATE_TABLES, LEGACY_PRUNED, Index, Located, Plan, Span, check_file, dir_key, spans
from pipeline.store.results import SCHEMAS, DamagedFile, Results, rows_table

Damaged = tuple[str, str]  # (key, why): a file that was read and does not read whole


class RunState(str, Enum):
    absent = "absent"  # no row (or a damaged one)
    failed = "failed"  # the row says failed
    incomplete = "incomplete"  # the row says done, but its history or final checkpoint is missing
    done = "done"  # the row says done, and its history and final checkpoint are there


def load_final(results: Results, run_id: str) -> dict[str, Any]:
    """A run's final checkpoint from the store (``CheckpointError`` if missing or damaged)."""
    key = f"{results.checkpoint_key(run_id)}/{FINAL}"
    try:
        data = results.store.read_bytes(key)
    except FileNotFoundError:
        raise checkpoint.CheckpointError(f"run {run_id} has no final checkpoint in {results}; train it first (`iwae-pipeline sweep JOB`)") from None
    return checkpoint.from_bytes(data, results.store.uri(key))


@dataclass(frozen=True)
class Found:
    """One run as :func:`run_state` found it."""

    state: RunState
    row: dict[str, Any] | None = None  # its row, when that reads
    why: str = ""  # why it is not done, in one line (incomplete runs)
    damaged: tuple[Damaged, ...] = ()


def _history(results: Results, run_id: str) -> str:
    return results.history_key(run_id)


def _final(results: Results, run_id: str) -> str:
    return f"{results.checkpoint_key(run_id)}/{FINAL}"


def _state(results: Results, run_id: str, data: bytes | None, has_history: bool, has_final: bool) -> Found:
    """A run's state from its row's bytes (None: no row) and whether its other files exist."""
    if data is None:
        return Found(RunState.absent)
    try:
        rows = results.parse(data, "runs", results.row_key(run_id)).to_pylist()
    except DamagedFile as e:
        return Found(RunState.absent, damaged=((results.row_key(run_id), str(e)),))
    if not rows:
        return Found(RunState.absent, damaged=((results.row_key(run_id), f"{results.store.uri(results.row_key(run_id))} is empty"),))
    row = rows[0]
    if row["status"] != "done":
        return Found(RunState.failed, row)
    if not has_history:
        return Found(RunState.incomplete, row, f"run {run_id} has no training history in {results}; run the sweep again")
    if not has_final:
        return Found(RunState.incomplete, row, f"run {run_id} has no final checkpoint in {results}; run the sweep again")
    return Found(RunState.done, row)


def run_state(results: Results, run_id: str) -> Found:
    """The one definition of a run's state (see :class:`RunState`), for one run: its row (one GET),
    then for a done row a HEAD each of its history and its final checkpoint."""
    try:
        data: bytes | None = results.store.read_bytes(results.row_key(run_id))
    except FileNotFoundError:
        data = None
    if data is None:
        return Found(RunState.absent)
    final = results.store.size(_final(results, run_id))
    return _state(results, run_id, data, results.store.exists(_history(results, run_id)), bool(final))  # an empty final.pt is none, as in a listing


PER_RUN = 8  # up to this many runs are read run by run; more, by listing the location's tables once


@dataclass(frozen=True)
class RunLedger:
    """The state of a job's runs, read once (:meth:`read`) and passed on."""

    found: Mapping[str, Found]

    @classmethod
    def read(cls, results: Results, run_ids: Iterable[str], by_listing: bool | None = None) -> RunLedger:
        """The runs' states: a few requests per run for a handful of runs (or ``by_listing=False``, a
        task's own members); for a grid, three listings (rows, histories, checkpoints: a request per
        1,000 files) and the rows that exist, read in parallel."""
        ids = list(dict.fromkeys(run_ids))
        if not (by_listing if by_listing is not None else len(ids) > PER_RUN):
            return cls({rid: run_state(results, rid) for rid in ids})
        store = results.store
        rows = {k for k in store.list("tables/runs", ".parquet")}
        histories = {k for k in store.list("tables/train", ".parquet")}
        finals = {e.key for e in store.entries("runs", FINAL) if e.size > 0}
        have = [rid for rid in ids if results.row_key(rid) in rows]
        blobs = dict(zip(have, store.read_many([results.row_key(rid) for rid in have])))
        return cls({rid: _state(results, rid, blobs.get(rid), _history(results, rid) in histories, _final(results, rid) in finals) for rid in ids})

    @property
    def damaged(self) -> list[Damaged]:
        return [d for f in self.found.values() for d in f.damaged]

    def state(self, run_id: str) -> RunState:
        return self.found[run_id].state if run_id in self.found else RunState.absent

    def done(self, run_id: str) -> bool:
        return self.state(run_id) == RunState.done

    def row(self, run_id: str) -> dict[str, Any] | None:
        return self.found[run_id].row if run_id in self.found else None

    def incomplete(self, cfgs: Sequence[RunConfig]) -> list[str]:
        """Why each run that says done is not complete (a missing final checkpoint, say)."""
        return [self.found[c.run_id].why for c in cfgs if self.state(c.run_id) == RunState.incomplete]

    def todo(self, cfgs: Sequence[RunConfig]) -> list[RunConfig]:
        return [c for c in cfgs if not self.done(c.run_id)]

    def with_done(self, run_ids: Iterable[str]) -> RunLedger:
        """The ledger after these runs finished (what a sweep reports back)."""
        return RunLedger({**self.found, **{rid: Found(RunState.done) for rid in run_ids}})


def repair(results: Results, damaged: Iterable[Damaged], notice: Callable[[str], None] | None = None) -> int:
    """Move each damaged file to ``_quarantine/`` (kept, never deleted) and name it in one line. Returns how many moved."""
    moved = 0
    for key, why in damaged:
        try:
            where = results.store.quarantine(key)
        except FileNotFoundError:
            continue  # another command moved it first
        moved += 1
        if notice:
            notice(f"{results.store.uri(key)}: {why}; moved to {where}")
    return moved


# ---------------------------------------------------------------------------------------- repair


def check_location(results: Results, notice: Callable[[str], None] | None = None) -> dict[str, int]:
    """``iwae-pipeline repair``: read every file of the location (rows, histories, final checkpoints,
    estimate files), move what does not read whole aside, and rewrite estimate files of earlier
    layouts into the current one (hive folders, no config columns; an earlier layout's pruned column
    becomes its own estimate). Returns what it did, by kind. It downloads everything: run it when a
    reader names a damaged file, not before every command."""
    from iwae import checkpoint as ck

    store = results.store
    damaged: list[Damaged] = []
    keys = store.list("tables/runs", ".parquet") + store.list("tables/train", ".parquet")
    for key, data in zip(keys, store.read_many(keys)):
        if data is None:
            continue
        try:
            results.parse(data, "runs" if key.startswith("tables/runs/") else "train", key)
        except DamagedFile as e:
            damaged.append((key, str(e)))
    finals = [e.key for e in store.entries("runs", FINAL)]
    for key in finals:  # one at a time: 5 MB each
        try:
            ck.from_bytes(store.read_bytes(key), store.uri(key))
        except FileNotFoundError:
            continue
        except ck.CheckpointError as e:
            damaged.append((key, str(e)))
    migrated = 0
    for table in ESTIMATE_TABLES:
        index = Index.read(results, table)
        existing = {loc.key for loc in index.all()}  # one listing per table, kept up to date as files are written
        for f in index.all():
            try:
                why, _ = check_file(results, f, table)
            except FileNotFoundError:
                continue
            if why is not None:
                damaged.append((f.key, f"{why} (run {f.run_id}, {f.estimate})"))
            elif not f.hive or f.first is None:  # an earlier layout's folder, or a shard's name
                migrated += _migrate(results, f, table, existing)
    moved = repair(results, damaged, notice)
    return {"checked": len(keys) + len(finals), "moved": moved, "migrated": migrated}


def _migrate(results: Results, f: Located, table: str, existing: set[str]) -> int:
    """Rewrite one file of an earlier layout into the current one, then delete it: its rows without
    the config columns, cut into the fixed ranges, under ``run_id=/estimate=`` folders; a range
    already there is kept as it is. Returns 1 when the old file is gone."""
    from pipeline.store.estimates import AISPlan, EvalPlan

    t = results.read_file(f.key, table)
    d = t.to_pandas()
    parts: list[tuple[str, Any]] = [(f.estimate, d)]
    if "log_px_pruned" in d and d.log_px_pruned.notna().any() and not f.estimate.endswith("-pruned"):
        own = d.assign(log_px=d.log_px_pruned, eval_pruned=True)
        for c in ["ess", "khat", "mcse", "log_px_jk", *[c for c in d.columns if c.startswith("l_")]]:
            own[c] = float("nan")
        parts.append((f.estimate + LEGACY_PRUNED, own))
    size = AISPlan.range_size if table in ("ais", "bdmc") else EvalPlan.range_size
    for estimate, frame in parts:
        for span in spans(f.run_id, frame.image_id.tolist(), size):
            key = f"tables/{table}/run_id={f.run_id}/estimate={estimate}/{span.name}"
            if key in existing:
                continue
            rows = frame[(frame.image_id >= span.first) & (frame.image_id <= span.last)].to_dict("records")
            results.store.write_table(key, rows_table(rows, SCHEMAS[table]))
            existing.add(key)
    results.store.delete(f.key)
    return 1


# ---------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Survey:
    """One run's estimate as found: the ranges left to score and the files to repair."""

    todo: list[Span]
    damaged: list[Damaged]
    covered: int = 0  # images of the plan already written


@dataclass(frozen=True)
class EstimateLedger:
    """One estimate (:mod:`pipeline.store.estimates`) of a job's runs in a results location: which of the
    plan's images are written, the ranges left, and the one writer of a scored range."""

    results: Results
    plan: Plan

    def survey(self, run_id: str, index: Index | None = None) -> Survey:
        """The run's files of this estimate by name (from ``index``, one listing of the table): the
        images range files hold (a file of an earlier layout's shards is read: its name does not say),
        empty files (to repair), and the rest of the plan's images as ranges to score."""
        index = index or Index.read(self.results, self.plan.table)
        covered: set[int] = set()
        damaged: list[Damaged] = []
        for f in index.of(run_id, self.plan.estimate):
            if f.size == 0:
                damaged.append((f.key, f"is empty (run {run_id}, {self.plan.estimate})"))
            elif f.first is not None and f.last is not None:
                covered |= set(range(f.first, f.last + 1))
            else:
                try:
                    why, ids = check_file(self.results, f, self.plan.table)
                except FileNotFoundError:
                    continue
                if why is not None:
                    damaged.append((f.key, f"{why} (run {run_id}, {self.plan.estimate})"))
                covered |= ids
        missing = [i for i in range(self.plan.num_images) if i not in covered]
        return Survey(spans(run_id, missing, self.plan.range_size), damaged, self.plan.num_images - len(missing))

    def prepare(self, run_ids: Sequence[str], notice: Callable[[str], None] | None = None) -> list[Span]:
        """The driver's step before scoring: one listing of the table, each run surveyed by name,
        empty files moved aside; the ranges left, run by run."""
        index = Index.read(self.results, self.plan.table)
        items: list[Span] = []
        for rid in run_ids:
            sv = self.survey(rid, index)
            repair(self.results, sv.damaged, notice)
            items += sv.todo
        return items

    def rows(self, run_id: str, ids: Sequence[int]) -> pa.Table | None:
        """This estimate's rows of ``ids``, or None unless all are written: the range file of exactly
        those images when there is one (one GET), else the run's files that hold any of them."""
        want = sorted({int(i) for i in ids})
        if not want:
            return None
        exact = f"{dir_key(self.plan, run_id)}/{Span(run_id, want[0], want[-1]).name}"
        if want == list(range(want[0], want[-1] + 1)):
            try:
                t = self.results.read_file(exact, self.plan.table)
                if sorted(t.column("image_id").to_pylist()) == want:
                    return t.select(SCHEMAS[self.plan.table].names).cast(SCHEMAS[self.plan.table])
            except (FileNotFoundError, DamagedFile):
                pass
        got: dict[int, dict[str, Any]] = {}
        wanted = set(want)
        files = Index.read(self.results, self.plan.table).of(run_id, self.plan.estimate)
        files = [f for f in files if f.first is None or (f.last is not None and f.first <= want[-1] and f.last >= want[0])]
        for f, data in zip(files, self.results.store.read_many([f.key for f in files])):
            if data is None:
                continue
            try:
                t = self.results.parse(data, self.plan.table, f.key)
            except DamagedFile:
                continue
            for row in t.to_pylist():
                if int(row["image_id"]) in wanted:
                    got.setdefault(int(row["image_id"]), row)
        if set(got) < wanted:
            return None
        return rows_table([got[i] for i in want], SCHEMAS[self.plan.table])

    def written(self, run_id: str) -> set[str]:
        """The names of the run's files of this estimate, by one listing (a retried unit skips them)."""
        return {e.key.rsplit("/", 1)[1] for e in self.results.store.entries(dir_key(self.plan, run_id), ".parquet") if e.size > 0}

    def write(self, span: Span, table: pa.Table) -> int:
        """The one writer: check a scored range and write it whole under its name. Returns the rows."""
        if table.num_rows != len(span.ids) or sorted(table.column("image_id").to_pylist()) != span.ids.tolist():
            raise RuntimeError(f"{span} came back with {table.num_rows} rows, expected {len(span.ids)}")
        schema = SCHEMAS[self.plan.table]
        self.results.store.write_table(f"{dir_key(self.plan, span.run_id)}/{span.name}", table.select(schema.names).cast(schema))
        return table.num_rows
