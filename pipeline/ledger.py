"""What a results location holds for a job, read once per command: the run ledger and the shard ledger.

- :class:`RunLedger`: the state of each run (``absent``, ``failed``, ``incomplete``, ``done``) by the
  one definition of done (:func:`run_state`). The driver reads it when a command starts and every
  later step consults that value; a trial reads its own members' state the same way.
- :class:`ShardLedger`: the layout of one evaluation (:class:`EvalPlan`) in the store: shard keys,
  the identity file, which shards are left, whether a written shard reads whole, writing a shard.
  The local and the Ray evaluation share it and differ only in who scores the shards.

Readers here never move a file. What does not read whole is reported as ``damaged`` (key, why), and
:func:`repair` (run by the driver before any work) moves it to ``_quarantine/``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import numpy as np
import pyarrow as pa

from iwae import checkpoint
from iwae.ais import AISConfig
from iwae.config import RunConfig
from iwae.evaluate import EvalConfig
from iwae.train import FINAL
from pipeline.errors import UserError
from pipeline.results import SCHEMAS, DamagedFile, Results

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


class _Shards:
    """What every evaluation plan shares: the first ``num_images`` images split into ``shards``."""

    num_images: int
    shards: int

    def shard_ids(self, shard: int) -> np.ndarray:
        return np.array_split(np.arange(self.num_images), self.shards)[shard]


@dataclass(frozen=True)
class EvalPlan(_Shards):
    """What an evaluation covers: the first ``num_images`` test (or training) images, in ``shards``.

    ``images="train"`` scores the first training images instead, into the ``eval_train`` table: the
    train-test gap of the paper's appendix, where the authors ran the same k=5000 estimate on train.
    """

    config: EvalConfig
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
        return f"k{self.config.k}-seed{self.config.seed}-block{self.config.block}"

    def identity(self) -> dict[str, Any]:
        c = self.config
        return {"k": c.k, "seed": c.seed, "block": c.block, "num_images": self.num_images, "shards": self.shards, "pruned": self.pruned}

    def matches(self, t: pa.Table) -> bool:
        """The shard's rows carry this estimator's settings."""
        d = t.select(["eval_k", "eval_seed"]).to_pydict()
        return set(d["eval_k"]) == {self.config.k} and set(d["eval_seed"]) == {self.config.seed}


@dataclass(frozen=True)
class AISPlan(_Shards):
    """An AIS evaluation (:mod:`iwae.ais`): the first ``num_images`` test images, binarised as the
    k=5000 evaluation binarises them (``binarize_seed``), so both estimates score the same images;
    or, with ``method="bdmc"``, ``num_images`` images simulated from each model (BDMC bounds)."""

    config: AISConfig
    num_images: int
    shards: int
    method: str = "ais"
    binarize_seed: int = EvalConfig().seed
    pruned: bool = False
    images: str = "test"

    def __post_init__(self) -> None:
        if self.method not in ("ais", "bdmc"):
            raise ValueError(f"method must be ais or bdmc, got {self.method!r}")

    @property
    def table(self) -> str:
        return self.method

    @property
    def estimate(self) -> str:
        c = self.config
        return f"T{c.steps}-C{c.chains}-L{c.leapfrog}-P{c.pilot_steps}-seed{c.seed}"

    def identity(self) -> dict[str, Any]:
        c = self.config
        return {
            "method": self.method,
            "steps": c.steps,
            "chains": c.chains,
            "leapfrog": c.leapfrog,
            "seed": c.seed,
            "pilot_steps": c.pilot_steps,
            "binarize_seed": self.binarize_seed,
            "num_images": self.num_images,
            "shards": self.shards,
            "pruned": False,
        }

    def matches(self, t: pa.Table) -> bool:
        d = t.select(["ais_steps", "ais_chains", "ais_leapfrog", "ais_seed"]).to_pydict()
        c = self.config
        want = {"ais_steps": c.steps, "ais_chains": c.chains, "ais_leapfrog": c.leapfrog, "ais_seed": c.seed}
        return all(set(d[k]) == {v} for k, v in want.items())


Plan = EvalPlan | AISPlan


@dataclass(frozen=True)
class Survey:
    """One run's evaluation as found: the shards left, the files to repair, and whether an earlier
    evaluation of at least these images already stands for this one."""

    todo: list[int]
    damaged: list[Damaged]
    covered: bool = False


@dataclass(frozen=True)
class ShardLedger:
    """The layout of one evaluation plan in a results location (see the module docstring)."""

    results: Results
    plan: Plan

    def dir_key(self, run_id: str) -> str:
        return f"tables/{self.plan.table}/{run_id}/{self.plan.estimate}"

    def shard_key(self, run_id: str, shard: int) -> str:
        return f"{self.dir_key(run_id)}/shard-{shard:05d}-of-{self.plan.shards:05d}.parquet"

    def identity_key(self, run_id: str) -> str:
        return f"{self.dir_key(run_id)}/_eval.json"

    def problem(self, run_id: str, shard: int, plan: Plan | None = None) -> str | None:
        """Why a written shard does not count as done (None when it reads whole and matches).

        Done means: its Parquet reads, its row count equals the shard's image count, and its rows
        carry this evaluation's identity (run, k, seed, images). ``FileNotFoundError`` when there is none.
        """
        ledger = self if plan is None else ShardLedger(self.results, plan)
        try:
            t = self.results.read_file(ledger.shard_key(run_id, shard), ledger.plan.table)
        except DamagedFile:
            return "does not read as Parquet"
        want = ledger.plan.shard_ids(shard)
        if t.num_rows != len(want):
            return f"has {t.num_rows} rows, not {len(want)}"
        d = t.select(["run_id", "image_id"]).to_pydict()
        if set(d["run_id"]) != {run_id} or not ledger.plan.matches(t):
            return "belongs to another evaluation"
        if sorted(d["image_id"]) != want.tolist():
            return "holds other images"
        return None

    def _whole(self, run_id: str, plan: Plan) -> bool:
        try:
            return all(self.problem(run_id, s, plan) is None for s in range(plan.shards))
        except FileNotFoundError:
            return False

    def survey(self, run_id: str) -> Survey:
        """Read (never move) the run's evaluation: identity, then each shard. ``UserError`` when the
        run was evaluated with other settings that do not cover this plan."""
        new = self.plan.identity()
        try:
            old = json.loads(self.results.store.read_bytes(self.identity_key(run_id)))
        except (FileNotFoundError, ValueError):
            old = None  # none yet, or damaged: written again by claim (the shards are checked one by one)
        if old is not None and old != new:
            n_old = int(old.get("shards", 0))
            old_plan = replace(self.plan, num_images=int(old.get("num_images", 0)), shards=n_old, pruned=bool(old.get("pruned")))
            covers = old_plan.num_images >= self.plan.num_images and (old_plan.pruned or not self.plan.pruned)
            if covers and self._whole(run_id, old_plan):  # a run shared by two jobs is scored once
                return Survey([], [], covered=True)
            diff = ", ".join(f"{k}={old.get(k)}" for k in new if old.get(k) != new[k])
            raise UserError(f"run {run_id} was evaluated with {diff}; use the same options, or a new --results location")
        todo, damaged = [], []
        for s in range(self.plan.shards):
            try:
                why = self.problem(run_id, s)
            except FileNotFoundError:
                todo.append(s)
                continue
            if why is not None:
                damaged.append((self.shard_key(run_id, s), f"{why} (shard {s} of run {run_id})"))
                todo.append(s)
        return Survey(todo, damaged)

    def claim(self, run_id: str) -> None:
        """Record this evaluation's identity for the run before its first shard is written, only where
        none is recorded (compare-and-set on a local disk, S3 and GCS, :meth:`Store.create`), then read it back:
        of two evaluations started at once with other settings the second stops in one line instead
        of writing shards of another layout beside the first."""
        key, new = self.identity_key(run_id), self.plan.identity()
        try:
            old = json.loads(self.results.store.read_bytes(key))
        except FileNotFoundError:
            old = None
        except ValueError:
            old = None  # damaged: written again
        if old is None:
            store = self.results.store
            if not store.create(key, json.dumps(new, sort_keys=True).encode()):  # another command was first
                try:
                    old = json.loads(store.read_bytes(key))
                except ValueError:  # a damaged identity: ours replaces it
                    store.write_bytes(key, json.dumps(new, sort_keys=True).encode())
            old = json.loads(store.read_bytes(key))
        if old != new:
            diff = ", ".join(f"{k}={old.get(k)}" for k in new if old.get(k) != new[k])
            raise UserError(f"run {run_id} is being evaluated with {diff} by another command; use the same options, or wait for it to finish")

    def prepare(self, run_ids: Sequence[str], notice: Callable[[str], None] | None = None) -> list[tuple[str, int]]:
        """The driver's step before scoring: survey each run, repair what is damaged, claim the
        evaluation; returns the (run, shard) items left, in order."""
        items = []
        for rid in run_ids:
            sv = self.survey(rid)
            repair(self.results, sv.damaged, notice)
            if not sv.covered:
                self.claim(rid)
            items += [(rid, s) for s in sv.todo]
        return items

    def write(self, run_id: str, shard: int, table: pa.Table) -> int:
        """The one writer: check a scored shard and write it whole. Returns the rows written."""
        want = self.plan.shard_ids(shard)
        if table.num_rows != len(want) or sorted(table.column("image_id").to_pylist()) != want.tolist():
            raise RuntimeError(f"shard {shard} of run {run_id} came back with {table.num_rows} rows, expected {len(want)}")
        self.results.store.write_table(self.shard_key(run_id, shard), table.cast(SCHEMAS[self.plan.table]))
        return table.num_rows
