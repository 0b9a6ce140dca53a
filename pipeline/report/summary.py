"""Load once: a results location's runs and estimates, read through the one reader, and a summary
with one row per run. The tables, the findings and the plots read this, never the store.

Each run's row carries its **cell** (:func:`iwae.config.cell_key`: the config without the
objective's kind and the seed) and its **headline estimate**: L_5000 (``k5000-seed123-block500``)
by name, or, for a run that has none, the importance-sampling estimate with the most test images
(named in every table that shows it). Two runs are only ever compared on an estimate both have,
image by image.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from iwae.config import CELL_FREE, ModelConfig, RunConfig, cell_key
from iwae.diagnostics import KHAT_UNRELIABLE
from pipeline.store import estimates
from pipeline.store.estimates import HEADLINE, LEGACY_PRUNED
from pipeline.store.results import PREFIXES, Results

FAMILY_FREE = (*CELL_FREE, "k", "m", "beta")  # Table 2: a swap and its control differ in the bound
MATCHED_FREE = (*FAMILY_FREE, "estimator")  # estimators table: any bound and gradient at the same samples per example


def _py(v: Any) -> Any:
    """A Parquet value as plain Python (numpy scalars hash and print as their Python values)."""
    if isinstance(v, np.generic):
        return v.item()
    return None if v is pd.NA else v


def setting_of(row: dict[str, Any]) -> dict[str, Any]:
    """A run's :meth:`RunConfig.setting` from its runs-table row: exact from its ``config`` JSON; an
    earlier row (flat columns only) takes the defaults for the fields it does not show."""
    if isinstance(row.get("config"), str) and row["config"]:
        return RunConfig.from_dict(json.loads(row["config"])).setting()
    flat = {k: _py(row.get(k)) for k in RunConfig().flat()}
    paper = ModelConfig.paper(int(flat["layers"] or 1))
    extra = {
        "x_dim": 784,
        "hidden_q": json.dumps(paper.hidden_q),
        "hidden_p": json.dumps(paper.hidden_p),
        "batch_size": 20,
        "constant_epochs": 0,
        "constant_lr": 0.0,
        "num_active_examples": 500,
    }
    return {**flat, **extra}


def setting_label(s: dict[str, Any]) -> str:
    """What sets a run's setup apart from the paper's, in a few words ("" when nothing does)."""
    out = []
    if s["split"] != "paper":
        out.append(f"split {s['split']}")
    if s["train_subset"]:
        out.append(f"first {s['train_subset']:,} training images")
    if s["authors_code"]:
        out.append("authors' code")
    if s["epoch_scale"] != 1.0:
        out.append(f"epoch scale {s['epoch_scale']:g}")
    if s["batch_size"] != 20:
        out.append(f"batch {s['batch_size']}")
    paper = ModelConfig.paper(int(s["layers"]), int(s["x_dim"]))
    if (s["hidden_q"], s["hidden_p"]) != (json.dumps(paper.hidden_q), json.dumps(paper.hidden_p)) or s["latent"] != "-".join(map(str, paper.latent)):
        out.append(f"latent {s['latent']}, hidden {s['hidden_q']}/{s['hidden_p']}")
    if s["num_active_examples"] != 500:
        out.append(f"units from {s['num_active_examples']} images")
    return ", ".join(out)


def estimate_label(name: str) -> str:
    """An estimate's short name in a table: ``L_5000`` for the paper's, else ``L_100 (k100-seed123-block50)``."""
    if name == HEADLINE:
        return "L_5000"
    if name.startswith("k") and "-seed" in name:
        return f"L_{name[1:].split('-')[0]} ({name})"
    return name


@dataclass(frozen=True)
class Loaded:
    """What a report reads, loaded once (module docstring), and indexed once: one run's rows of one
    estimate are a dictionary look-up, never a scan of every row (a grid of thousands of runs)."""

    summary: pd.DataFrame  # one row per run
    ev: pd.DataFrame  # test-image estimates: one row per run, estimate and image
    ev_train: pd.DataFrame  # the same on training images
    ais: pd.DataFrame
    bdmc: pd.DataFrame
    train: pd.DataFrame  # training history, one row per epoch
    notes: tuple[str, ...] = ()  # one-line notices (a cell holding two runs of one kind and seed)
    models: pd.DataFrame = field(default_factory=pd.DataFrame)  # the models scored with `score` (their runs-table rows): the models table

    def _table(self, table: str) -> pd.DataFrame:
        return {"eval": self.ev, "eval_train": self.ev_train, "ais": self.ais, "bdmc": self.bdmc}[table]

    @functools.cached_property
    def memo(self) -> dict[str, Any]:
        """What the report's sections derive from this and share (Table 1's cells): computed once."""
        return {}

    @functools.cached_property
    def _indexes(self) -> dict[str, dict[tuple[str, str], pd.DataFrame]]:
        return {}  # filled on first use, one table at a time

    def _index(self, table: str) -> dict[tuple[str, str], pd.DataFrame]:
        if table not in self._indexes:
            self._indexes[table] = index_by_run(self._table(table))
        return self._indexes[table]

    def values(self, run_id: str, estimate: str, table: str = "eval") -> pd.DataFrame:
        """One run's rows of one estimate, indexed by image id."""
        got = self._index(table).get((str(run_id), str(estimate)))
        if got is None:  # none: one empty frame per table, not one per question (every run asks for its pruned twin)
            key = f"empty-{table}"
            if key not in self.memo:
                self.memo[key] = self._table(table).iloc[:0].set_index("image_id")
            got = self.memo[key]
        return got

    def log_px(self, run_id: str, estimate: str | None = None) -> pd.Series:
        """A run's per-image log p(x) under ``estimate`` (default: its headline), by image id."""
        est = estimate or self.headline_of(run_id)
        return self.values(run_id, est).log_px if est else pd.Series(dtype=float)

    @functools.cached_property
    def _headlines(self) -> dict[str, str]:
        return {str(r): str(e) for r, e in zip(self.summary.run_id, self.summary.estimate) if isinstance(e, str)} if len(self.summary) else {}

    def headline_of(self, run_id: str) -> str:
        return self._headlines.get(str(run_id), "")

    @functools.cached_property
    def _counts(self) -> dict[str, dict[str, int]]:
        return unpruned_counts(self._index("eval"))

    @functools.cached_property
    def _names(self) -> dict[str, dict[str, set[str]]]:
        return {}  # table -> run -> its estimates, filled on first use

    def estimates_in(self, run_id: str, table: str) -> set[str]:
        """The estimates a run has in ``table``."""
        if table not in self._names:
            by_run: dict[str, set[str]] = {}
            for rid, est in self._index(table):
                by_run.setdefault(rid, set()).add(est)
            self._names[table] = by_run
        return set(self._names[table].get(str(run_id), set()))

    def estimates_of(self, run_id: str) -> dict[str, int]:
        """A run's unpruned test-image L_k estimates and how many images each has."""
        return dict(self._counts.get(str(run_id), {}))

    def common_estimate(self, run_ids: Iterable[str]) -> str:
        """The L_k estimate the runs are compared on: L_5000 where all have it, else the estimate all
        have with the most images ("" when they share none)."""
        ids = list(run_ids)
        have = [self.estimates_of(r) for r in ids]
        shared = set.intersection(*(set(h) for h in have)) if have else set()
        if not shared:
            return ""
        if HEADLINE in shared:
            return HEADLINE
        return max(shared, key=lambda e: (min(h[e] for h in have), e))

    def pruned_of(self, run_id: str, estimate: str) -> tuple[str, pd.Series]:
        """The run's pruned-model estimate beside ``estimate``: ``(how, log p(x) by image)`` where how
        is "same draws" (common random numbers) or "own draws" (an earlier layout's column)."""
        for suffix, how in (("-pruned", "same draws"), (LEGACY_PRUNED, "own draws")):
            v = self.values(run_id, estimate + suffix).log_px
            if v.notna().any():
                return how, v
        return "", pd.Series(dtype=float)


def unpruned_counts(index: dict[tuple[str, str], pd.DataFrame]) -> dict[str, dict[str, int]]:
    """Each run's unpruned L_k estimates and how many images each has."""
    out: dict[str, dict[str, int]] = {}
    for (rid, est), g in index.items():
        if "-pruned" not in est:
            out.setdefault(rid, {})[est] = len(g)
    return out


def index_by_run(df: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    """An estimate table's rows by (run, estimate), each indexed by image id: one pass over the rows."""
    if df.empty:
        return {}
    return {(str(r), str(e)): g.set_index("image_id") for (r, e), g in df.groupby(["run_id", "estimate"], observed=True, sort=False)}


def headline(counts: dict[str, int]) -> str:
    if not counts:
        return ""
    return HEADLINE if HEADLINE in counts else max(counts, key=lambda e: (counts[e], e))


def figures_by_run(df: pd.DataFrame) -> dict[tuple[str, str], dict[str, Any]]:
    """Each (run, estimate)'s figures: images, NLL and its standard error, reliability (jackknife,
    median ESS, share of k-hat > 0.7, MCSE), the prefix NLLs; a figure is NaN where an image lacks
    it. One grouped pass over the rows of the table (a grid of thousands of runs), not one per run."""
    if df.empty:
        return {}
    cols = ["log_px_jk", "ess", "mcse", *[f"l_{p}" for p in PREFIXES]]
    work = pd.DataFrame(
        {
            "run_id": df.run_id,
            "estimate": df.estimate,
            "eval_k": df.eval_k,
            "eval_seed": df.eval_seed,
            "log_px": df.log_px,
            "khat_high": (df.khat > KHAT_UNRELIABLE).astype(float),
            "khat_seen": df.khat.notna(),
            **{c: df[c] for c in cols},
            **{f"{c}_missing": df[c].isna() for c in cols},
        }
    )
    g = work.groupby(["run_id", "estimate"], observed=True, sort=False)
    agg = g.agg(
        eval_k=("eval_k", "first"),
        eval_seed=("eval_seed", "first"),
        n=("log_px", "size"),
        lp_mean=("log_px", "mean"),
        lp_std=("log_px", "std"),
        ess_median=("ess", "median"),
        khat_high=("khat_high", "mean"),
        khat_seen=("khat_seen", "any"),
        **{f"{c}_mean": (c, "mean") for c in cols if c != "ess"},
        **{f"{c}_missing": (f"{c}_missing", "any") for c in cols},
    )
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for key, a in zip(agg.index, agg.itertuples(index=False)):
        r = a._asdict()
        n = int(r["n"])
        row: dict[str, Any] = {
            "eval_k": int(r["eval_k"]),
            "eval_seed": int(r["eval_seed"]),
            "test_images": n,
            "nll": -float(r["lp_mean"]),
            "nll_se": float(r["lp_std"] / math.sqrt(n)) if n > 1 else math.nan,
            "nll_jk": -float(r["log_px_jk_mean"]) if not r["log_px_jk_missing"] else math.nan,
            "ess_median": float(r["ess_median"]) if not r["ess_missing"] else math.nan,
            "khat_high": float(r["khat_high"]) if r["khat_seen"] else math.nan,
            "mcse_mean": float(r["mcse_mean"]) if not r["mcse_missing"] else math.nan,
        }
        for p in PREFIXES:
            row[f"nll_l{p}"] = -float(r[f"l_{p}_mean"]) if not r[f"l_{p}_missing"] else math.nan
        out[(str(key[0]), str(key[1]))] = row
    return out


def _units(a: object, b: object) -> str:
    if a is None or pd.isna(a):  # type: ignore[call-overload]
        return "-"
    return f"{int(a)}" if b is None or pd.isna(b) else f"{int(a)}+{int(b)}"  # type: ignore[call-overload]


def load(results: Results) -> Loaded:
    """Read the runs, their histories and every estimate once (in parallel, projected), index them
    by run and estimate once, and summarise each run from its own groups."""
    runs = results.read("runs")
    scored = runs.scored_model.notna() if "scored_model" in runs else pd.Series(False, index=runs.index)
    models, runs = runs[scored].reset_index(drop=True), runs[~scored].reset_index(drop=True)
    ev, ev_train = estimates.read(results, "eval"), estimates.read(results, "eval_train")
    ais, bdmc = estimates.read(results, "ais"), estimates.read(results, "bdmc")
    train = results.read("train")
    by_ev, by_train = index_by_run(ev), index_by_run(ev_train)
    figs, figs_train = figures_by_run(ev), figures_by_run(ev_train)
    counts = unpruned_counts(by_ev)
    rows = []
    for r in runs.to_dict("records"):
        rid = str(r["run_id"])
        s = setting_of(r)
        row = {**r, "cell": cell_key(s), "family": cell_key(s, FAMILY_FREE), "matched": cell_key(s, MATCHED_FREE), "setting": setting_label(s)}
        row["samples"] = int(s["k"]) * int(s["m"])
        est = headline(counts.get(rid, {}))
        row["estimate"] = est
        if est:
            mine = by_ev[(rid, est)]
            row.update(figs[(rid, est)])
            unpruned = mine.log_px
            for suffix in ("-pruned", LEGACY_PRUNED):
                p = by_ev.get((rid, est + suffix))
                p = p.log_px.dropna() if p is not None else pd.Series(dtype=float)
                if len(p):
                    both = p.index.intersection(unpruned.index)
                    row["nll_pruned"] = -float(p.reindex(both).mean())
                    break
            f = figs_train.get((rid, est))
            if f is not None:
                row.update({"train_images": f["test_images"], "train_nll": f["nll"], "train_nll_se": f["nll_se"]})
        row["active"] = _units(r.get("active_h1"), r.get("active_h2"))
        rows.append(row)
    columns = ["estimate", "eval_k", "eval_seed", "test_images", "nll", "nll_se", "nll_jk", "ess_median", "khat_high", "mcse_mean", "nll_pruned"]
    columns += [f"nll_l{p}" for p in PREFIXES] + ["train_images", "train_nll", "train_nll_se"]
    order = list(dict.fromkeys([*runs.columns, "cell", "family", "matched", "setting", "samples", "active", *columns]))
    summary = pd.DataFrame(rows, columns=order)
    summary["estimate"] = summary["estimate"].fillna("")
    summary["test_images"] = summary["test_images"].fillna(0).astype(int)
    summary["train_images"] = summary["train_images"].fillna(0).astype(int)
    summary = summary.sort_values(["dataset", "layers", "k", "objective", "estimator", "epochs", "seed", "run_id"]).reset_index(drop=True)
    loaded = Loaded(summary, ev, ev_train, ais, bdmc, train, tuple(_crowded(summary)), models)
    loaded._indexes.update(eval=by_ev, eval_train=by_train)  # built above: not again
    return loaded


def _crowded(summary: pd.DataFrame) -> list[str]:
    """Cells that hold two runs of one objective kind and seed (two configs that the runs table
    reads alike: rows from before the cell was stored, say): named, and left out of every pairing."""
    notes = []
    done = summary[summary.status == "done"]
    for (cell, obj, seed), g in done.groupby(["cell", "objective", "seed"]):
        if len(g) > 1:
            notes.append(
                f"cell {cell} holds {len(g)} runs of {str(obj).upper()} seed {seed} ({', '.join(sorted(g.run_id))}): "
                "their rows do not tell them apart, so no table pairs them"
            )
    return notes


def crowded_cells(loaded: Loaded) -> set[tuple[str, str, int]]:
    """(cell, objective, seed) of the crowded cells (:func:`_crowded`)."""
    done = loaded.summary[loaded.summary.status == "done"]
    sizes = done.groupby(["cell", "objective", "seed"]).size()
    return {(str(c), str(o), int(s)) for (c, o, s), n in sizes.items() if n > 1}
