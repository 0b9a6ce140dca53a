"""Every number keyed by what it measures: what an estimate is, where its rows live, the one reader.

An *estimate* is an estimator with its settings, applied to one run's images. Its name says what
changes the numbers, and names its folder:

- ``k5000-seed123-block500``: L_k by importance sampling (:mod:`iwae.evaluate`) with k samples,
  the binarisation and noise seed, and the noise block size;
- ``k5000-seed123-block500-pruned``: the same for the model with its inactive units removed
  (paper sec. 5.2), scored on the same draws as the model it was cut from (common random numbers);
- ``T500-C16-L10-P100-seed0``: AIS (:mod:`iwae.ais`) with T temperatures, C chains, L leapfrog
  steps, a P-temperature pilot and its seed (``-bin<seed>`` when the test images are binarised
  with another seed than 123); BDMC the same, in its own table.

Rows live in ``tables/<table>/<run_id>/<estimate>/`` in files of **fixed image ranges** named by
their first and last image (``images-00000-00499.parquet``): 500 images per range for L_k, 100 for
AIS and BDMC, cut where images are already covered. Every random number of an image is seeded by its
id, so two writers of one range write the same rows: more images means more ranges, never another
layout, and any command (``sweep``, ``evaluate``, ``train``, ``repro``) reuses every range already
written. Files of earlier layouts (``shard-00000-of-00004.parquet`` beside an ``_eval.json``) are
read as they are.

The one reader, :func:`read`, selects rows by estimate and counts each image once per run and
estimate, whichever files hold it (a range written twice under two names, say). Every consumer
reads through it: the report, ``repro``, ``train``'s summary line and :func:`read_estimates`, the
call the README gives for pandas.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa

from iwae.ais import AISConfig
from iwae.evaluate import EvalConfig
from pipeline.errors import UserError
from pipeline.store.results import SCHEMAS, DamagedFile, Results

ESTIMATE_TABLES = ("eval", "eval_train", "ais", "bdmc")
RANGE_NAME = re.compile(r"images-(\d+)-(\d+)\.parquet$")
LEGACY_PRUNED = "-pruned-own-noise"  # an earlier layout's pruned column: the pruned model scored on its own draws


@dataclass(frozen=True)
class EvalPlan:
    """L_k by importance sampling of the first ``num_images`` test (or training) images.

    ``pruned``: the estimate of the model with its inactive units removed, on the same draws.
    ``images="train"`` scores the first training images instead, into the ``eval_train`` table: the
    train-test gap of the paper's appendix, where the authors ran the same k=5000 estimate on train.
    """

    config: EvalConfig
    num_images: int
    pruned: bool = False
    images: str = "test"
    range_size: ClassVar[int] = 500

    def __post_init__(self) -> None:
        if self.images not in ("test", "train"):
            raise ValueError(f"images must be test or train, got {self.images!r}")
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")

    @property
    def table(self) -> str:
        return "eval" if self.images == "test" else "eval_train"

    @property
    def estimate(self) -> str:
        c = self.config
        return f"k{c.k}-seed{c.seed}-block{c.block}" + ("-pruned" if self.pruned else "")

    @property
    def unpruned(self) -> EvalPlan:
        return replace(self, pruned=False)

    def matches(self, t: pa.Table) -> bool:
        """The rows carry this estimate's settings (columns that earlier layouts lack are not asked)."""
        c = self.config
        want: dict[str, Any] = {"eval_k": c.k, "eval_seed": c.seed, "eval_block": c.block, "eval_pruned": self.pruned}
        return _carries(t, want, optional=("eval_block", "eval_pruned"))


@dataclass(frozen=True)
class AISPlan:
    """AIS (:mod:`iwae.ais`) on the first ``num_images`` test images, binarised as the k=5000
    evaluation binarises them (``binarize_seed``), so both estimates score the same images; or, with
    ``method="bdmc"``, on ``num_images`` images simulated from each model (BDMC bounds)."""

    config: AISConfig
    num_images: int
    method: str = "ais"
    binarize_seed: int = EvalConfig().seed
    images: str = "test"
    range_size: ClassVar[int] = 100
    pruned: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.method not in ("ais", "bdmc"):
            raise ValueError(f"method must be ais or bdmc, got {self.method!r}")
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")

    @property
    def table(self) -> str:
        return self.method

    @property
    def estimate(self) -> str:
        c = self.config
        binarised = f"-bin{self.binarize_seed}" if self.method == "ais" and self.binarize_seed != EvalConfig().seed else ""
        return f"T{c.steps}-C{c.chains}-L{c.leapfrog}-P{c.pilot_steps}-seed{c.seed}{binarised}"

    def matches(self, t: pa.Table) -> bool:
        c = self.config
        want: dict[str, Any] = {"method": self.method, "ais_steps": c.steps, "ais_chains": c.chains, "ais_leapfrog": c.leapfrog, "ais_seed": c.seed}
        if self.method == "ais":
            want["eval_seed"] = self.binarize_seed
        return _carries(t, want)


Plan = EvalPlan | AISPlan
HEADLINE = EvalPlan(EvalConfig(), 1).estimate  # the paper's number: L_5000, seed 123 (``k5000-seed123-block500``)


def _carries(t: pa.Table, want: dict[str, Any], optional: tuple[str, ...] = ()) -> bool:
    for col, value in want.items():
        got = set(t.column(col).to_pylist())
        if col in optional and got == {None}:
            continue
        if got != {value}:
            return False
    return True


class Span(NamedTuple):
    """A unit of evaluation work: images ``first..last`` (inclusive) of one run, one file."""

    run_id: str
    first: int
    last: int

    @property
    def ids(self) -> np.ndarray:
        return np.arange(self.first, self.last + 1)

    @property
    def name(self) -> str:
        return f"images-{self.first:05d}-{self.last:05d}.parquet"

    def __str__(self) -> str:
        return f"run {self.run_id} images {self.first}-{self.last}"


def spans(run_id: str, missing: Iterable[int], size: int) -> list[Span]:
    """The images ``missing`` as ranges: contiguous, and cut at every multiple of ``size``, so a
    range never straddles two of the fixed ranges (``[0, size)``, ``[size, 2 size)``, ...)."""
    out: list[Span] = []
    first = last = None
    for i in sorted(set(int(i) for i in missing)):
        if first is not None and last is not None and i == last + 1 and i % size != 0:
            last = i
            continue
        if first is not None and last is not None:
            out.append(Span(run_id, first, last))
        first = last = i
    if first is not None and last is not None:
        out.append(Span(run_id, first, last))
    return out


def dir_key(plan: Plan, run_id: str) -> str:
    return f"tables/{plan.table}/{run_id}/{plan.estimate}"


def check_file(results: Results, key: str, run_id: str, plan: Plan) -> tuple[str | None, set[int]]:
    """Whether a written file counts, and its images: ``(None, ids)`` when it reads whole, carries
    this run and estimate, holds each image once and, for a range file, exactly the images its name
    says; else ``(why, set())``. ``FileNotFoundError`` when it is gone."""
    try:
        t = results.read_file(key, plan.table)
    except DamagedFile:
        return "does not read as Parquet", set()
    if t.num_rows == 0:
        return "is empty", set()
    d = t.select(["run_id", "image_id"]).to_pydict()
    if set(d["run_id"]) != {run_id} or not plan.matches(t):
        return "belongs to another evaluation", set()
    ids = [int(i) for i in d["image_id"]]
    if len(set(ids)) != len(ids):
        return "holds an image twice", set()
    m = RANGE_NAME.search(key)
    if m and sorted(ids) != list(range(int(m.group(1)), int(m.group(2)) + 1)):
        return "holds other images than its name says", set()
    return None, set(ids)


# ---------------------------------------------------------------------------------------- the one reader


def read(results: Results, table: str) -> pd.DataFrame:
    """Every estimate of ``table`` (``eval``, ``eval_train``, ``ais``, ``bdmc``): one row per run,
    estimate and image, with the estimate's name in the ``estimate`` column.

    An image held by two files of one estimate (a range written under two names, or an earlier
    layout beside a new one) counts once. An earlier layout's pruned column (``log_px_pruned``,
    the pruned model scored on its own draws) is read as the estimate ``<name>-pruned-own-noise``.
    A file that does not parse stops the reader in one line (a writer command moves it aside)."""
    if table not in ESTIMATE_TABLES:
        raise ValueError(f"{table} is not an estimate table ({', '.join(ESTIMATE_TABLES)})")
    schema = SCHEMAS[table]
    tables, names = [], []
    for key in results.store.list(f"tables/{table}", ".parquet"):
        parts = key.split("/")
        if len(parts) != 5:
            raise UserError(f"{results.store.uri(key)} is not in an estimate's folder (tables/{table}/RUN/ESTIMATE/); move it out of the results")
        try:
            t = results.read_file(key, table)
        except DamagedFile as e:
            raise UserError(f"{e}; move that file out of the results (a re-run of the same command redoes it)") from None
        tables.append(t)
        names += [parts[3]] * t.num_rows
    df = (pa.concat_tables(tables) if tables else schema.empty_table()).to_pandas()
    df["estimate"] = pd.Series(names, dtype=object, index=df.index)
    if table in ("eval", "eval_train") and len(df):
        legacy = df[df.log_px_pruned.notna() & ~df.estimate.str.endswith("-pruned")]
        if len(legacy):
            cols = ["ess", "khat", "mcse", "log_px_jk", *[c for c in df.columns if c.startswith("l_")]]
            moved = legacy.assign(log_px=legacy.log_px_pruned, estimate=legacy.estimate + LEGACY_PRUNED, eval_pruned=True)
            moved[cols] = np.nan
            df = pd.concat([df, moved], ignore_index=True)
    return df.drop_duplicates(["run_id", "estimate", "image_id"]).reset_index(drop=True)


def read_estimates(location: str, table: str = "eval", estimate: str | None = HEADLINE) -> pd.DataFrame:
    """One estimate of a results location as a DataFrame, one row per run and image (``estimate=None``:
    every estimate, told apart by the ``estimate`` column). For notebooks and pandas::

        from pipeline.store.estimates import read_estimates
        ev = read_estimates("results/demo")  # L_5000 (k5000-seed123-block500) of every run's test images
    """
    df = read(Results.open(location, create=False), table)
    return df if estimate is None else df[df.estimate == estimate].reset_index(drop=True)
