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

Rows live in ``tables/<table>/run_id=<id>/estimate=<name>/`` (hive-style: pandas, DuckDB, Polars
and Spark read ``run_id`` and ``estimate`` as columns with no project code) in files of **fixed image
ranges** named by their first and last image (``images-00000-00499.parquet``): 500 images per range
for L_k, 100 for AIS and BDMC, cut where images are already covered. Every random number of an image
is seeded by its id, so two writers of one range write the same rows: more images means more
ranges, never another layout, and any command (``sweep``, ``evaluate``, ``train``, ``repro``) reuses
every range already written. A file holds the estimate's figures and settings per image, not the
run's config (one join away, in the runs table).

What is written is known by name: one listing of a table (:class:`Index`, a request per 1,000
files) says which ranges of which run and estimate exist. Contents are checked where they are
read: the one writer checks what it writes, the reader names a file that does not parse, and
``iwae-pipeline repair`` moves it aside. Files of earlier layouts (``tables/<table>/<run_id>/
<estimate>/``, and ``shard-00000-of-00004.parquet`` files there) are read as they are, and
``repair`` rewrites them into this one.

The one reader, :func:`read`, reads the files in parallel and counts each image once per run and
estimate, whichever files hold it (a range written twice under two layouts, say). Every consumer
reads through it: the report, ``repro``, ``train``'s summary line and :func:`read_estimates`, the
call the README gives for pandas.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from iwae.settings import AISConfig, EvalConfig
from pipeline.errors import UserError
from pipeline.store.results import DamagedFile, Results, read_schema

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
        """``T500-C16-L10-P100-seed0``, then every other setting that changes the numbers where it is
        not the default: the binarisation seed (``-bin7``) and the step-size adaptation (``-eps0.1``,
        ``-acc0.8``, ``-min1e-05``, ``-max1``), so that no two settings share a name (and the names of
        estimates written before these were named stay what they were)."""
        c, d = self.config, AISConfig()
        binarised = f"-bin{self.binarize_seed}" if self.method == "ais" and self.binarize_seed != EvalConfig().seed else ""
        tuned = "".join(
            f"-{tag}{getattr(c, f):g}" for tag, f in (("eps", "step_size"), ("acc", "target_accept"), ("min", "step_min"), ("max", "step_max"))
            if getattr(c, f) != getattr(d, f)
        )  # fmt: skip
        return f"T{c.steps}-C{c.chains}-L{c.leapfrog}-P{c.pilot_steps}-seed{c.seed}{binarised}{tuned}"


Plan = EvalPlan | AISPlan
HEADLINE = EvalPlan(EvalConfig(), 1).estimate  # the paper's number: L_5000, seed 123 (``k5000-seed123-block500``)


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
    """The folder of one run's estimate (hive-style)."""
    return f"tables/{plan.table}/run_id={run_id}/estimate={plan.estimate}"


class Located(NamedTuple):
    """A file of an estimate table, as its key names it."""

    key: str
    run_id: str
    estimate: str
    size: int
    first: int | None  # its images, from a range file's name (None: a file of an earlier layout, a shard)
    last: int | None
    hive: bool  # in the current layout (run_id=/estimate= folders)


def locate(table: str, key: str, size: int = 1) -> Located | None:
    """What ``key`` is (None: not a file of an estimate's folder)."""
    parts = key.split("/")
    if len(parts) != 5 or parts[0] != "tables" or parts[1] != table or not parts[4].endswith(".parquet"):
        return None
    run, est = parts[2], parts[3]
    hive = run.startswith("run_id=") and est.startswith("estimate=")
    if hive:
        run, est = run[len("run_id=") :], est[len("estimate=") :]
    elif "=" in run or "=" in est:
        return None
    m = RANGE_NAME.fullmatch(parts[4])
    first, last = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    return Located(key, run, est, size, first, last, hive)


@dataclass(frozen=True)
class Index:
    """Every file of one estimate table, from one listing: by (run, estimate)."""

    table: str
    files: dict[tuple[str, str], list[Located]]

    @classmethod
    def read(cls, results: Results, table: str) -> Index:
        files: dict[tuple[str, str], list[Located]] = {}
        for e in results.store.entries(f"tables/{table}", ".parquet"):
            loc = locate(table, e.key, e.size)
            if loc is None:
                raise UserError(
                    f"{results.store.uri(e.key)} is not in an estimate's folder (tables/{table}/run_id=RUN/estimate=NAME/); move it out of the results"
                )
            files.setdefault((loc.run_id, loc.estimate), []).append(loc)
        return cls(table, files)

    def of(self, run_id: str, estimate: str) -> list[Located]:
        return self.files.get((run_id, estimate), [])

    def all(self) -> list[Located]:
        return [f for fs in self.files.values() for f in fs]


def settings_of(estimate: str) -> dict[str, Any]:
    """The settings an estimate's name says, as the columns its rows carry (``{}`` for a name that is
    not one of ours: nothing to compare)."""
    m = re.fullmatch(r"k(\d+)-seed(\d+)-block(\d+)(-pruned)?", estimate)
    if m:
        return {"eval_k": int(m.group(1)), "eval_seed": int(m.group(2)), "eval_block": int(m.group(3)), "eval_pruned": bool(m.group(4))}
    m = re.fullmatch(r"T(\d+)-C(\d+)-L(\d+)-P(\d+)-seed(\d+)(?:-bin(\d+))?(?:-.*)?", estimate)
    if m:
        out: dict[str, Any] = {"ais_steps": int(m.group(1)), "ais_chains": int(m.group(2)), "ais_leapfrog": int(m.group(3)), "ais_seed": int(m.group(5))}
        if m.group(6):
            out["eval_seed"] = int(m.group(6))
        return out
    return {}


def check_file(results: Results, f: Located, table: str) -> tuple[str | None, set[int]]:
    """Whether a written file counts, by its contents: ``(None, ids)`` when it reads whole, carries
    its folder's run (earlier layouts) and estimate settings, holds each image once and, for a range
    file, exactly the images its name says; else ``(why, set())``. ``FileNotFoundError`` when it is
    gone. :func:`pipeline.store.ledger.repair` and a file of an earlier layout's shards use it."""
    try:
        t = results.read_file(f.key, table)
    except DamagedFile:
        return "does not read as Parquet", set()
    if t.num_rows == 0:
        return "is empty", set()
    runs = set(t.column("run_id").to_pylist())
    if runs not in ({None}, {f.run_id}):
        return "belongs to another run", set()
    legacy = f.estimate.endswith(LEGACY_PRUNED)
    want = {} if legacy else settings_of(f.estimate)
    optional = ("eval_block", "eval_pruned")
    for col, value in want.items():
        got = set(t.column(col).to_pylist())
        if col in optional and got == {None}:
            continue
        if got != {value}:
            return "belongs to another evaluation", set()
    ids = [int(i) for i in t.column("image_id").to_pylist()]
    if len(set(ids)) != len(ids):
        return "holds an image twice", set()
    if f.first is not None and sorted(ids) != list(range(f.first, (f.last or 0) + 1)):
        return "holds other images than its name says", set()
    return None, set(ids)


# ---------------------------------------------------------------------------------------- the one reader


def _parse(results: Results, key: str, data: bytes | None, table: str) -> pa.Table | None:
    if data is None:
        return None  # moved aside since the listing
    try:
        return pq.read_table(pa.BufferReader(data), schema=read_schema(table))
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, OSError) as e:
        raise UserError(
            f"{results.store.uri(key)} is not a valid {table} table ({type(e).__name__}); run `iwae-pipeline repair --results"
            f" {shlex.quote(results.location)}` to move it aside (the next evaluation scores it again)"
        ) from None


def read(
    results: Results, table: str, estimates: Iterable[str] | None = None, run_ids: Iterable[str] | None = None, index: Index | None = None
) -> pd.DataFrame:
    """Every estimate of ``table`` (``eval``, ``eval_train``, ``ais``, ``bdmc``), or those named: one
    row per run, estimate and image, with ``run_id`` and ``estimate`` as categorical columns (the
    run's config is in the runs table: join on ``run_id``).

    The files are read in parallel, each once, projected to the table's columns. An image held by
    two files of one estimate (a range in both layouts, say) counts once. An earlier layout's pruned
    column (``log_px_pruned``, the pruned model scored on its own draws) is read as the estimate
    ``<name>-pruned-own-noise``. A file that does not parse stops the reader in one line naming it
    (``iwae-pipeline repair`` moves it aside)."""
    if table not in ESTIMATE_TABLES:
        raise ValueError(f"{table} is not an estimate table ({', '.join(ESTIMATE_TABLES)})")
    index = index or Index.read(results, table)
    want_e = set(estimates) if estimates is not None else None
    want_r = set(run_ids) if run_ids is not None else None
    files = [
        f
        for f in index.all()
        if f.size > 0 and (want_r is None or f.run_id in want_r) and (want_e is None or f.estimate in want_e or f.estimate + LEGACY_PRUNED in want_e)
    ]
    files.sort(key=lambda f: (not f.hive, f.key))  # the current layout first: its rows win a tie
    parsed = results.store.read_many([f.key for f in files], parse=lambda key, data: _parse(results, key, data, table))  # parsed as read, in parallel
    tables, runs, names = [], [], []
    for f, t in zip(files, parsed):
        if t is None or t.num_rows == 0:
            continue
        tables.append(t.drop_columns([c for c in ("run_id", "shard") if c in t.column_names]))
        runs.append((f.run_id, t.num_rows))
        names.append((f.estimate, t.num_rows))
    del parsed
    schema = read_schema(table)
    merged = pa.concat_tables(tables) if tables else schema.empty_table().drop_columns([c for c in ("run_id", "shard") if c in schema.names])
    del tables
    df = merged.to_pandas(self_destruct=True)  # each column's Arrow buffers freed once converted
    del merged
    pa.default_memory_pool().release_unused()  # and given back, not kept by Arrow's allocator
    df.insert(0, "run_id", _repeat(runs))
    df.insert(1, "estimate", _repeat(names))
    if table in ("eval", "eval_train") and len(df) and df.log_px_pruned.notna().any():
        legacy = df[df.log_px_pruned.notna() & ~df.estimate.astype(str).str.endswith("-pruned")]
        if len(legacy):
            cols = ["ess", "khat", "mcse", "log_px_jk", *[c for c in df.columns if c.startswith("l_")]]
            moved = legacy.assign(log_px=legacy.log_px_pruned, estimate=legacy.estimate.astype(str) + LEGACY_PRUNED, eval_pruned=True)
            moved[cols] = np.nan
            df = pd.concat([df.assign(estimate=df.estimate.astype(str)), moved], ignore_index=True)
            df["estimate"] = df["estimate"].astype("category")
    if "log_px_pruned" in df:
        df = df.drop(columns=["log_px_pruned"])
    if want_e is not None and len(df):
        df = df[df.estimate.isin(want_e)]
    if _may_overlap(files):  # two files of one estimate that may share images (ranges of two sizes, two layouts)
        df = df.drop_duplicates(["run_id", "estimate", "image_id"])
    for c in ("run_id", "estimate"):
        df[c] = df[c].cat.remove_unused_categories() if isinstance(df[c].dtype, pd.CategoricalDtype) else df[c].astype("category")
    return df.reset_index(drop=True)


def _may_overlap(files: list[Located]) -> bool:
    """Whether two of the files of one run's estimate may hold one image: their ranges (by name)
    overlap, or one has no range in its name (an earlier layout's shard). Files of one range are
    written whole, once, so without an overlap no row is there twice."""
    spans: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for f in files:
        if f.first is None or f.last is None:
            return True
        spans.setdefault((f.run_id, f.estimate.removesuffix(LEGACY_PRUNED)), []).append((f.first, f.last))
    for ranges in spans.values():
        ranges.sort()
        if any(b[0] <= a[1] for a, b in zip(ranges, ranges[1:])):
            return True
    return False


def _repeat(counts: list[tuple[str, int]]) -> pd.Categorical:
    """``value`` repeated ``n`` times for each ``(value, n)``, as one categorical (codes, not strings)."""
    cats = sorted({v for v, _ in counts})
    code = {v: i for i, v in enumerate(cats)}
    codes = np.repeat(np.array([code[v] for v, _ in counts], dtype=np.int32), [n for _, n in counts]) if counts else np.zeros(0, dtype=np.int32)
    return pd.Categorical.from_codes(codes, categories=cats)


def read_estimates(location: str, table: str = "eval", estimate: str | None = HEADLINE) -> pd.DataFrame:
    """One estimate of a results location as a DataFrame, one row per run and image (``estimate=None``:
    every estimate, told apart by the ``estimate`` column). For notebooks and pandas::

        from pipeline.store.estimates import read_estimates
        ev = read_estimates("results/demo")  # L_5000 (k5000-seed123-block500) of every run's test images
    """
    return read(Results.open(location, create=False), table, None if estimate is None else [estimate])
