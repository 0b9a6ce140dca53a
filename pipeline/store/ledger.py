"""What a results location holds for a job, read once per command: the run ledger and the shard ledger.

- :class:`RunLedger`: the state of each run (``absent``, ``failed``, ``incomplete``, ``done``) by the
  one definition of done (:func:`run_state`). The driver reads it when a command starts and every
  later step consults that value; a trial reads its own members' state the same way.
- :class:`EstimateLedger`: one estimate (:mod:`pipeline.store.estimates`) of the job's runs in the store:
  the images written whole, the fixed ranges left, writing a range. The local and the Ray
  evaluation share it and differ only in who scores the ranges.

Readers here never move a file. What does not read whole is reported as ``damaged`` (key, why), and
:func:`repair` (run by the driver before any work) moves it to ``_quarantine/``.
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
from pipeline.store.estimates import Plan, Span, check_file, dir_key, spans
from pipeline.store.results import SCHEMAS, DamagedFile, Results

Damaged = tuple[str, str]  # (key, why): a file that was read and does not read whole


class RunState(str, Enum):
    absent = "absent"  # no row (or a damaged one)
    failed = "failed"  # the row says failed
    incomplete = "incomplete"  # the row says done, but its history or final checkpoint is missing or damaged
    done = "done"  # the row says done, its history reads and its final checkpoint reads


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


def run_state(results: Results, run_id: str) -> Found:
    """The one definition of a run's state (see :class:`RunState`)."""
    try:
        row = results.read_row(run_id)
    except DamagedFile as e:
        return Found(RunState.absent, damaged=((results.row_key(run_id), str(e)),))
    if row is None:
        return Found(RunState.absent)
    if row["status"] != "done":
        return Found(RunState.failed, row)
    try:
        results.read_file(results.history_key(run_id), "train")
    except FileNotFoundError:
        return Found(RunState.incomplete, row, f"run {run_id} has no training history in {results}; run the sweep again")
    except DamagedFile as e:
        return Found(RunState.incomplete, row, f"{e}; run the sweep again", ((results.history_key(run_id), str(e)),))
    try:
        load_final(results, run_id)
    except checkpoint.CheckpointError as e:  # the trial resumes and quarantines it through its checkpoint sink
        return Found(RunState.incomplete, row, str(e))
    return Found(RunState.done, row)


@dataclass(frozen=True)
class RunLedger:
    """The state of a job's runs, read once (:meth:`read`) and passed on."""

    found: Mapping[str, Found]

    @classmethod
    def read(cls, results: Results, run_ids: Iterable[str]) -> RunLedger:
        return cls({rid: run_state(results, rid) for rid in dict.fromkeys(run_ids)})

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
        """Why each run that says done is not complete (a missing or damaged checkpoint, say)."""
        return [self.found[c.run_id].why for c in cfgs if self.state(c.run_id) == RunState.incomplete]

    def todo(self, cfgs: Sequence[RunConfig]) -> list[RunConfig]:
        return [c for c in cfgs if not self.done(c.run_id)]

    def with_done(self, run_ids: Iterable[str]) -> RunLedger:
        """The ledger after these runs finished (what a sweep reports back)."""
        return RunLedger({**self.found, **{rid: Found(RunState.done) for rid in run_ids}})


def repair(results: Results, damaged: Iterable[Damaged], notice: Callable[[str], None] | None = None) -> None:
    """Move each damaged file to ``_quarantine/`` (kept, never deleted) and name it in one line."""
    for key, why in damaged:
        try:
            where = results.store.quarantine(key)
        except FileNotFoundError:
            continue  # another command moved it first
        if notice:
            notice(f"{results.store.uri(key)}: {why}; moved to {where}")


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

    def survey(self, run_id: str) -> Survey:
        """Read (never move) the run's files of this estimate: the images they hold whole, the files
        that do not read whole (to repair), and the rest of the plan's images as ranges to score."""
        covered: set[int] = set()
        damaged: list[Damaged] = []
        for key in self.results.store.list(dir_key(self.plan, run_id), ".parquet"):
            try:
                why, ids = check_file(self.results, key, run_id, self.plan)
            except FileNotFoundError:
                continue  # moved aside by another command since the listing
            if why is not None:
                damaged.append((key, f"{why} (run {run_id}, {self.plan.estimate})"))
            covered |= ids
        wanted = range(self.plan.num_images)
        missing = [i for i in wanted if i not in covered]
        return Survey(spans(run_id, missing, self.plan.range_size), damaged, self.plan.num_images - len(missing))

    def prepare(self, run_ids: Sequence[str], notice: Callable[[str], None] | None = None) -> list[Span]:
        """The driver's step before scoring: survey each run, repair what is damaged; the ranges left."""
        items: list[Span] = []
        for rid in run_ids:
            sv = self.survey(rid)
            repair(self.results, sv.damaged, notice)
            items += sv.todo
        return items

    def rows(self, run_id: str, ids: Sequence[int]) -> pa.Table | None:
        """This estimate's rows of ``ids`` from the files written whole, or None unless all are there."""
        want = {int(i) for i in ids}
        got: dict[int, dict[str, Any]] = {}
        for key in self.results.store.list(dir_key(self.plan, run_id), ".parquet"):
            try:
                why, have = check_file(self.results, key, run_id, self.plan)
            except FileNotFoundError:
                continue
            if why is None and have & want:
                t = self.results.read_file(key, self.plan.table)
                for row in t.to_pylist():
                    got.setdefault(int(row["image_id"]), row)
        if set(got) < want:
            return None
        return pa.Table.from_pylist([got[i] for i in sorted(want)], schema=SCHEMAS[self.plan.table])

    def write(self, span: Span, table: pa.Table) -> int:
        """The one writer: check a scored range and write it whole under its name. Returns the rows."""
        if table.num_rows != len(span.ids) or sorted(table.column("image_id").to_pylist()) != span.ids.tolist():
            raise RuntimeError(f"{span} came back with {table.num_rows} rows, expected {len(span.ids)}")
        self.results.store.write_table(f"{dir_key(self.plan, span.run_id)}/{span.name}", table.cast(SCHEMAS[self.plan.table]))
        return table.num_rows
