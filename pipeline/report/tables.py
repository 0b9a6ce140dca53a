"""The report's tables, from a :class:`~pipeline.report.summary.Loaded` (never the store).

Every table pairs runs only within a cell (:func:`iwae.config.cell_key`) and only on an estimate
both runs have, image by image (:func:`pipeline.report.stats.paired`). A cell whose setup differs
from the paper's (a smoke cut's training subset, the authors' code, another split) is its own row,
labelled by what differs; the estimate each row shows is named.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.report.stats import Paired, paired, se, shared_images
from pipeline.report.summary import Loaded, crowded_cells, estimate_label
from pipeline.store.estimates import HEADLINE

# Table 1 of Burda et al. 2016 (v4): test NLL (nats) and active units, 3,280 epochs.
PAPER_TABLE1 = {
    ("mnist", 1, 1): (86.76, "19", 86.76, "19"),
    ("mnist", 1, 5): (86.47, "20", 85.54, "22"),
    ("mnist", 1, 50): (86.35, "20", 84.78, "25"),
    ("mnist", 2, 1): (85.33, "16+5", 85.33, "16+5"),
    ("mnist", 2, 5): (85.01, "17+5", 83.89, "21+5"),
    ("mnist", 2, 50): (84.78, "17+5", 82.90, "26+7"),
    ("omniglot", 1, 1): (108.11, "28", 108.11, "28"),
    ("omniglot", 1, 5): (107.62, "28", 106.12, "34"),
    ("omniglot", 1, 50): (107.80, "28", 104.67, "41"),
    ("omniglot", 2, 1): (107.58, "28+4", 107.56, "30+5"),
    ("omniglot", 2, 5): (106.31, "30+5", 104.79, "38+6"),
    ("omniglot", 2, 50): (106.30, "30+5", 103.38, "44+7"),
}
PAPER_TABLE2 = {("vae", 1): (86.76, "19", 84.88, "22"), ("iwae", 50): (84.78, "25", 86.02, "23")}


def fmt(v: float | None, err: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f} ± {err:.2f}" if err is not None and not math.isnan(err) else f"{v:.2f}"


def markdown(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (pandas' ``to_markdown`` needs tabulate, which this project does not install)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def name(r: Any, origin: bool = True) -> str:
    """A run's label, with its seed when that is not 0 and the run it continued (two seeds of one
    cell, or a run and its continuation, must not read alike)."""
    n = f"{r.label} s{r.seed}" if int(r.seed) else str(r.label)
    return f"{n} from {r.init_from}" if origin and r.init_from else n


def run_labels(summary: pd.DataFrame) -> dict[str, str]:
    """Each run's name in the plots: the tables' name, so two seeds or a run and its continuation differ."""
    return {str(r.run_id): name(r) for r in summary.itertuples()}


MAX_ROWS = 100  # per-run tables beyond this show their first rows and failed runs; summary.parquet holds every run


def nll(loaded: Loaded, run_id: str, estimate: str, images: pd.Index | None = None) -> tuple[float, float, int]:
    """A run's NLL under ``estimate``: mean over its images (or only ``images``), standard error, images."""
    lp = loaded.log_px(run_id, estimate).dropna() if estimate else pd.Series(dtype=float)
    if images is not None:
        lp = lp.reindex(lp.index.intersection(images))
    return (-float(lp.mean()), se(lp), len(lp)) if len(lp) else (math.nan, math.nan, 0)


def capped(rows: list[list[Any]], keep: Sequence[bool], what: str = "runs") -> tuple[list[list[Any]], str]:
    """A per-run table's rows, at most :data:`MAX_ROWS` of them plus every row ``keep`` marks (failed
    runs): the rows and a note saying what was left out ("" when nothing was)."""
    if len(rows) <= MAX_ROWS:
        return rows, ""
    shown = [r for i, (r, k) in enumerate(zip(rows, keep)) if i < MAX_ROWS or k]
    return shown, f"{len(rows) - len(shown):,} more {what} are in summary.parquet beside this report (one row per run)."


def gap(loaded: Loaded, a: str, b: str, estimate: str | None = None) -> Paired:
    """log p_b(x) - log p_a(x) per image under an estimate both runs have (default: the one they
    are compared on, :meth:`Loaded.common_estimate`), on the images both scored."""
    est = estimate if estimate is not None else loaded.common_estimate([a, b])
    if not est:
        return Paired(math.nan, math.nan, 0)
    return paired(loaded.log_px(a, est), loaded.log_px(b, est))


# ---------------------------------------------------------------------------------------- Table 1


@dataclass(frozen=True)
class CellSeed:
    """One seed of one Table 1 cell: its VAE and IWAE (at k=1 one model fills both), and the estimate
    both are shown and compared on."""

    cell: str
    seed: int
    vae: Any  # a summary row (namedtuple) or None
    iwae: Any
    estimate: str

    @property
    def first(self) -> Any:
        return self.vae if self.vae is not None else self.iwae

    @property
    def complete(self) -> bool:
        return self.vae is not None and self.iwae is not None and self.vae.run_id != self.iwae.run_id


def table1_cells(loaded: Loaded) -> list[CellSeed]:
    """The Table 1 runs (VAE and IWAE, standard gradient, from scratch), by cell and seed (computed
    once per report: every section asks)."""
    if "table1_cells" in loaded.memo:
        return list(loaded.memo["table1_cells"])
    s = loaded.summary
    done = s[(s.status == "done") & (s.estimator == "standard") & s.objective.isin(["vae", "iwae"]) & (s.init_from == "")]
    crowded = crowded_cells(loaded)
    by: dict[tuple[str, int], dict[str, Any]] = {}
    for r in done.itertuples():  # one pass over the rows (a grid of thousands of runs)
        by.setdefault((str(r.cell), int(r.seed)), {}).setdefault(str(r.objective), r)
    out = []
    for (cell, seed), g in by.items():
        if any((cell, o, seed) in crowded for o in ("vae", "iwae")):
            continue  # named by the report's notes: never pick one of two
        v, i = g.get("vae"), g.get("iwae")
        if i is None and v is not None and int(v.k) == 1:
            i = v  # L_1 is the ELBO: one model in both columns, as in the paper
        ids = [r.run_id for r in (v, i) if r is not None]
        est = loaded.common_estimate(ids) or loaded.headline_of(ids[0])
        out.append(CellSeed(str(cell), int(seed), v, i, est))
    key = lambda c: (c.first.dataset, int(c.first.layers), int(c.first.k), int(c.first.epochs), c.first.setting, c.seed)  # noqa: E731
    loaded.memo["table1_cells"] = sorted(out, key=key)
    return list(loaded.memo["table1_cells"])


def _estimate_cell(loaded: Loaded, c: CellSeed) -> str:
    if c.complete:
        n = len(shared_images([loaded.log_px(r.run_id, c.estimate) for r in (c.vae, c.iwae)]))
    else:
        n = max(nll(loaded, r.run_id, c.estimate)[2] for r in (c.vae, c.iwae) if r is not None)
    return f"{estimate_label(c.estimate)}, {n:,} images" if c.estimate else "not evaluated"


def table1(loaded: Loaded) -> str:
    """VAE vs IWAE per cell and seed, ours beside the paper's, with the paired gain."""
    rows = []
    for c in table1_cells(loaded):
        f = c.first
        both = shared_images([loaded.log_px(r.run_id, c.estimate) for r in (c.vae, c.iwae)]) if c.complete else None  # a pair's NLLs on the same images
        v, i = (nll(loaded, r.run_id, c.estimate, both) if r is not None else (math.nan, math.nan, 0) for r in (c.vae, c.iwae))
        g = gap(loaded, c.vae.run_id, c.iwae.run_id, c.estimate) if c.complete else Paired(math.nan, math.nan, 0)
        paper = PAPER_TABLE1.get((f.dataset, int(f.layers), int(f.k)))
        rows.append(
            [
                f.dataset,
                f.layers,
                f.k,
                f.epochs,
                f.setting or "paper",
                c.seed,
                _estimate_cell(loaded, c),
                fmt(v[0], v[1]),
                c.vae.active if c.vae is not None else "-",
                fmt(i[0], i[1]),
                c.iwae.active if c.iwae is not None else "-",
                fmt(g.mean, g.se),
                f"{paper[0]:.2f} ({paper[1]})" if paper else "-",
                f"{paper[2]:.2f} ({paper[3]})" if paper else "-",
            ]
        )
    head = ["data", "layers", "k", "epochs", "setup", "seed", "estimate", "VAE NLL", "VAE active", "IWAE NLL", "IWAE active", "IWAE gain (paired)"]
    return markdown([*head, "paper VAE", "paper IWAE"], rows)


def seed_table(loaded: Loaded) -> str | None:
    """Cells trained with more than one seed: each objective's NLL per seed and its spread across
    seeds, beside the paired IWAE gain per seed (its standard error is within one seed only)."""
    by_cell: dict[str, list[CellSeed]] = {}
    for c in table1_cells(loaded):
        if c.complete:
            by_cell.setdefault(c.cell, []).append(c)
    rows = []
    for cs in by_cell.values():
        if len(cs) < 2:
            continue
        f = cs[0].first
        cells = []
        for obj in ("vae", "iwae"):
            vals = [nll(loaded, getattr(c, obj).run_id, c.estimate)[0] for c in cs]
            cells.append(" / ".join(f"{x:.2f}" for x in vals) + f" (sd {np.std(vals, ddof=1):.2f})")
        gains = [gap(loaded, c.vae.run_id, c.iwae.run_id, c.estimate) for c in cs]
        spread = f"{np.std([g.mean for g in gains], ddof=1):.2f}"
        rows.append(
            [f.dataset, f.layers, f.k, f.epochs, f.setting or "paper", ", ".join(str(c.seed) for c in cs), cells[0], cells[1]]
            + [" / ".join(fmt(g.mean, g.se) for g in gains), spread]
        )
    if not rows:
        return None
    head = ["data", "layers", "k", "epochs", "setup", "seeds", "VAE NLL per seed", "IWAE NLL per seed", "IWAE gain per seed (paired)"]
    return markdown([*head, "sd of the gain across seeds"], rows)


# ---------------------------------------------------------------------------------------- the rest


def reliability_table(loaded: Loaded) -> str | None:
    """Per run: how far to trust its headline estimates, from the same pass (iwae.diagnostics)."""
    s = loaded.summary
    done = s[(s.status == "done") & s.nll.notna()]
    if done.empty:
        return None
    rows = []
    for r in done.itertuples():
        jk_gap = r.nll - r.nll_jk if not pd.isna(r.nll_jk) else math.nan  # NLL from L_k minus NLL from the jackknife
        rows.append(
            [name(r), estimate_label(r.estimate), int(r.test_images), fmt(r.nll), fmt(r.nll_jk), f"{jk_gap:.3f}"]
            + [f"{r.ess_median:.0f}", f"{100 * r.khat_high:.1f}%", f"{r.mcse_mean:.3f}"]
        )
    head = ["run", "estimate", "images", "NLL from L_k", "NLL from the jackknife", "L_k - jackknife", "median ESS", "k-hat > 0.7", "mean MC s.e."]
    rows, note = capped(rows, [False] * len(rows))
    return markdown(head, rows) + (f"\n\n{note}" if note else "")


def table2(loaded: Loaded) -> str | None:
    """The objective swap: each continued run beside the run it started from (paired gain), and
    beside its control: the same model continued with its own objective for as long (same family,
    :data:`~pipeline.report.summary.FAMILY_FREE`), paired."""
    s = loaded.summary
    done = s[s.status == "done"].set_index("run_id", drop=False)
    cont = done[done.init_from != ""]
    rows = []
    for rid, r in cont.iterrows():
        if r.init_from not in done.index:
            continue
        src = done.loc[r.init_from]
        swapped = (r.objective, r.k) != (src.objective, src.k)
        g = gap(loaded, str(r.init_from), str(rid))
        ctrl = cont[(cont.family == r.family) & (cont.seed == r.seed) & (cont.objective == src.objective) & (cont.k == src.k)]
        vs = gap(loaded, str(ctrl.index[0]), str(rid)) if swapped and len(ctrl) == 1 else Paired(math.nan, math.nan, 0)
        paper = PAPER_TABLE2.get((str(src.objective), int(src.k))) if swapped else None
        b, a = nll(loaded, str(r.init_from), r.estimate), nll(loaded, str(rid), r.estimate)
        rows.append(
            [
                f"{name(src)} -> {name(r, origin=False)}{'' if swapped else ' (control)'}",
                f"{src.epochs} + {r.epochs}",
                f"{fmt(b[0], b[1])} ({src.active})",
                f"{fmt(a[0], a[1])} ({r.active})",
                fmt(g.mean, g.se),
                fmt(vs.mean, vs.se),
                f"{paper[0]:.2f} ({paper[1]}) -> {paper[2]:.2f} ({paper[3]})" if paper else "-",
            ]
        )
    if not rows:
        return None
    head = ["first stage -> second stage", "epochs", "NLL (active) before", "NLL (active) after", "log p gain (paired)", "swap vs control (paired)", "paper"]
    return markdown(head, rows)


def gap_table(loaded: Loaded) -> str | None:
    """Train-test gap: test NLL minus train NLL under the same estimate (positive: the model fits its
    training images better). The paper's appendix reports it from the same k=5000 estimate on train."""
    s = loaded.summary
    rows = []
    for r in s[(s.status == "done") & (s.train_images > 0)].itertuples():
        d = r.nll - r.train_nll
        err = math.sqrt(r.nll_se**2 + r.train_nll_se**2)
        rows.append([name(r), r.epochs, estimate_label(r.estimate), f"{fmt(r.train_nll, r.train_nll_se)} ({int(r.train_images)})"])
        rows[-1] += [f"{fmt(r.nll, r.nll_se)} ({int(r.test_images)})", fmt(d, err)]
    if not rows:
        return None
    return markdown(["run", "epochs", "estimate", "train NLL (images)", "test NLL (images)", "gap: test - train"], rows)


def estimator_table(loaded: Loaded) -> str | None:
    """Runs at matched cost (same samples per example, same setup otherwise): every estimator or bound
    against the standard IWAE of its own seed."""
    s = loaded.summary
    done = s[(s.status == "done") & (s.init_from == "")]
    other = (done.estimator != "standard") | done.objective.isin(["miwae", "ciwae", "piwae"])
    if not other.any():
        return None  # a grid of VAEs and IWAEs only
    done = done[done.set_index(["matched", "seed"]).index.isin(done[other].set_index(["matched", "seed"]).index)]  # the groups that have one
    rows = []
    for (_, _seed), g in done.groupby(["matched", "seed"], sort=True):
        base = g[(g.objective == "iwae") & (g.estimator == "standard")]
        others = g[(g.estimator != "standard") | g.objective.isin(["miwae", "ciwae", "piwae"])]
        if len(base) != 1 or others.empty:
            continue
        b = next(base.itertuples())
        bn = nll(loaded, b.run_id, b.estimate)
        rows.append([name(b), b.samples, b.epochs, estimate_label(b.estimate), fmt(bn[0], bn[1]), b.active, "(reference)"])
        for r in others.itertuples():
            est = loaded.common_estimate([b.run_id, r.run_id])
            g_ = gap(loaded, b.run_id, r.run_id, est)
            rn = nll(loaded, r.run_id, est)
            rows.append([name(r), r.samples, r.epochs, estimate_label(est), fmt(rn[0], rn[1]), r.active, fmt(g_.mean, g_.se)])
    if not rows:
        return None
    return markdown(["run", "samples/example", "epochs", "estimate", "test NLL", "active", "log p gain vs IWAE (paired)"], rows)


def budget(loaded: Loaded) -> str:
    """What the numbers below rest on: the estimates (k, images, seed) and the training budget."""
    s = loaded.summary
    done = s[s.status == "done"]
    evals = sorted({(str(r.estimate), int(r.test_images)) for r in done.itertuples() if r.estimate})
    ev_txt = "; ".join(f"{estimate_label(e)} on {n:,} test images" for e, n in evals) or "not evaluated yet"
    trains = sorted({(int(r.epochs), int(r.train_subset)) for r in done.itertuples()})
    tr_txt = "; ".join(f"{e:,} epochs on {'the first ' + format(n, ',') if n else 'all'} training images" for e, n in trains)
    return (
        f"**Evaluation** (each run's headline estimate: {estimate_label(HEADLINE)} where it has one): {ev_txt}. **Training:** {tr_txt}. "
        "The paper: 3,280 epochs on all 60,000 MNIST training images, k=5,000 on all test images."
    )


def all_runs_table(loaded: Loaded) -> str:
    """Every run, failed ones included (beyond :data:`MAX_ROWS` runs: the first ones and every failed one)."""
    rows = []
    for r in loaded.summary.itertuples():
        err = f" ({r.error})" if r.status != "done" and r.error else ""
        rows.append(
            [r.run_id, name(r), r.epochs, r.setting or "paper", f"{r.status}{err}", estimate_label(r.estimate) if r.estimate else "-"]
            + [fmt(r.nll, r.nll_se), fmt(r.nll_pruned), r.active, int(r.test_images), fmt(r.train_seconds)]
        )
    rows, note = capped(rows, list(loaded.summary.status != "done"))
    table = markdown(["run", "what", "epochs", "setup", "status", "estimate", "test NLL", "pruned NLL", "active", "images", "train s"], rows)
    return table + (f"\n\n{note}" if note else "")
