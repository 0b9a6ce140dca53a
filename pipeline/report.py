"""Reports from the Parquet results alone: Table 1 with the paper's numbers beside ours, the
objective-swap and estimator tables, the train-test gap, and PNG plots.

Errors are standard errors of the mean over test images; comparisons of two runs on the same
images use the paired per-image difference.
"""

from __future__ import annotations

import functools
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from iwae.diagnostics import KHAT_UNRELIABLE
from iwae.units import THRESHOLD as UNIT_THRESHOLD
from pipeline.results import PREFIXES, Results
from pipeline.storage import Store

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


@dataclass(frozen=True)
class Report:
    markdown: str
    summary: pd.DataFrame
    files: tuple[str, ...]  # where each file was written (a path or a URI)


def run_summary(results: Results) -> pd.DataFrame:
    """One row per run: config, status, NLL mean and standard error, pruned NLL, active units, prefixes."""
    runs = results.read("runs")
    ev = results.read("eval")
    if runs.empty:
        return runs
    agg = []
    for run_id, g in ev.groupby("run_id"):
        g = g[g.eval_k == g.eval_k.max()]  # the headline estimate (k=5000) when a run has several
        row = {"run_id": run_id, "eval_k": int(g["eval_k"].iloc[0]), "eval_seed": int(g["eval_seed"].iloc[0])}
        row["test_images"], row["nll"], row["nll_se"] = _nll(g)
        row["nll_jk"] = -g["log_px_jk"].mean() if g["log_px_jk"].notna().all() else math.nan
        row["ess_median"] = float(g["ess"].median()) if g["ess"].notna().all() else math.nan
        row["khat_high"] = float((g["khat"] > KHAT_UNRELIABLE).mean()) if g["khat"].notna().any() else math.nan
        row["mcse_mean"] = float(g["mcse"].mean()) if g["mcse"].notna().all() else math.nan
        row["nll_pruned"] = -g["log_px_pruned"].mean() if g["log_px_pruned"].notna().all() else math.nan
        for p in PREFIXES:
            row[f"nll_l{p}"] = -g[f"l_{p}"].mean() if g[f"l_{p}"].notna().all() else math.nan
        agg.append(row)
    out = runs.merge(pd.DataFrame(agg), on="run_id", how="left") if agg else runs.assign(nll=math.nan, nll_se=math.nan, test_images=0)
    gap = [dict(zip(("run_id", "train_images", "train_nll", "train_nll_se"), (rid, *_nll(g)))) for rid, g in results.read("eval_train").groupby("run_id")]
    out = out.merge(pd.DataFrame(gap), on="run_id", how="left") if gap else out.assign(train_images=0, train_nll=math.nan, train_nll_se=math.nan)
    out["active"] = [_units(a, b) for a, b in zip(out["active_h1"], out["active_h2"])]
    return out.sort_values(["dataset", "layers", "k", "objective", "estimator", "epochs", "seed"]).reset_index(drop=True)


def _nll(g: pd.DataFrame) -> tuple[int, float, float]:
    """Images, mean NLL and its standard error over one run's evaluation rows."""
    n = len(g)
    return n, -g["log_px"].mean(), g["log_px"].std(ddof=1) / math.sqrt(n) if n > 1 else math.nan


def _units(a: object, b: object) -> str:
    if a is None or (isinstance(a, float) and math.isnan(a)) or pd.isna(a):  # type: ignore[arg-type]
        return "-"
    return f"{int(a)}" if b is None or pd.isna(b) else f"{int(a)}+{int(b)}"  # type: ignore[call-overload]


def _name(r: Any, origin: bool = True) -> str:
    """A run's label, with its seed when that is not 0 and the run it continued (two seeds of one
    cell, or a run and its continuation, must not read alike)."""
    name = f"{r.label} s{r.seed}" if int(r.seed) else str(r.label)
    return f"{name} from {r.init_from}" if origin and r.init_from else name


def run_labels(summary: pd.DataFrame) -> dict[str, str]:
    """Each run's name in the plots: the tables' name, so two seeds or a run and its continuation differ."""
    return {str(r.run_id): _name(r) for r in summary.itertuples()}


def _fmt(v: float, se: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f} ± {se:.2f}" if se is not None and not math.isnan(se) else f"{v:.2f}"


def _headline(ev: pd.DataFrame, run_id: str) -> pd.Series:
    """A run's headline log p(x) per image (the largest k)."""
    return _l5000(ev, run_id).log_px


def paired_gap(ev: pd.DataFrame, a: str, b: str) -> tuple[float, float, int]:
    """Mean and standard error of log p_b(x) - log p_a(x) over the images both runs evaluated."""
    pa = _headline(ev, a)
    pb = _headline(ev, b)
    d = (pb - pa).dropna()
    if len(d) < 2:
        return math.nan, math.nan, len(d)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))), len(d)


def table1(summary: pd.DataFrame, ev: pd.DataFrame) -> str:
    """VAE vs IWAE per (dataset, layers, k, epochs), ours beside the paper's, with the paired gap."""
    done = summary[(summary.status == "done") & (summary.estimator == "standard") & (summary.objective.isin(["vae", "iwae"])) & (summary.init_from == "")]
    lines = [
        "| data | layers | k | epochs | seed | VAE NLL | VAE active | IWAE NLL | IWAE active | IWAE gain (paired) | paper VAE | paper IWAE |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (dataset, layers, k, epochs, seed), g in done.groupby(["dataset", "layers", "k", "epochs", "seed"], sort=True):
        vae, iw = g[g.objective == "vae"], g[g.objective == "iwae"]
        v = vae.iloc[0] if len(vae) else None
        i = iw.iloc[0] if len(iw) else None
        if i is None and k == 1:
            i = v  # L_1 is the ELBO: one model in both columns, as in the paper
        if v is None and i is None:
            continue
        gain = paired_gap(ev, v.run_id, i.run_id) if v is not None and i is not None else (math.nan, math.nan, 0)
        paper = PAPER_TABLE1.get((dataset, int(layers), int(k)))
        lines.append(
            f"| {dataset} | {layers} | {k} | {epochs} | {seed} | "
            f"{_fmt(v.nll, v.nll_se) if v is not None else '-'} | {v.active if v is not None else '-'} | "
            f"{_fmt(i.nll, i.nll_se) if i is not None else '-'} | {i.active if i is not None else '-'} | "
            f"{_fmt(gain[0], gain[1])} | {f'{paper[0]:.2f} ({paper[1]})' if paper else '-'} | {f'{paper[2]:.2f} ({paper[3]})' if paper else '-'} |"
        )
    return "\n".join(lines)


def seed_table(summary: pd.DataFrame, ev: pd.DataFrame) -> str | None:
    """Cells of Table 1 trained with more than one seed: each objective's NLL per seed and its spread
    across seeds, beside the paired IWAE gain per seed (its standard error is within one seed only)."""
    done = summary[(summary.status == "done") & (summary.estimator == "standard") & (summary.objective.isin(["vae", "iwae"])) & (summary.init_from == "")]
    rows = []
    for (dataset, layers, k, epochs), g in done.groupby(["dataset", "layers", "k", "epochs"], sort=True):
        seeds = sorted(set(g.seed))
        if len(seeds) < 2 or k == 1:
            continue
        cells = []
        gains = []
        for obj in ("vae", "iwae"):
            vals = [g[(g.objective == obj) & (g.seed == s)].nll for s in seeds]
            nll = [float(v.iloc[0]) for v in vals if len(v)]
            cells.append(" / ".join(f"{x:.2f}" for x in nll) + (f" (sd {np.std(nll, ddof=1):.2f})" if len(nll) > 1 else ""))
        for sd in seeds:
            v, i = g[(g.objective == "vae") & (g.seed == sd)], g[(g.objective == "iwae") & (g.seed == sd)]
            if len(v) and len(i):
                gains.append(paired_gap(ev, str(v.run_id.iloc[0]), str(i.run_id.iloc[0])))
        gain_txt = " / ".join(_fmt(m, se) for m, se, _ in gains)
        spread = f"{np.std([m for m, _, _ in gains], ddof=1):.2f}" if len(gains) > 1 else "-"
        rows.append(f"| {dataset} | {layers} | {k} | {epochs} | {', '.join(map(str, seeds))} | {cells[0]} | {cells[1]} | {gain_txt} | {spread} |")
    if not rows:
        return None
    head = (
        "| data | layers | k | epochs | seeds | VAE NLL per seed | IWAE NLL per seed | IWAE gain per seed (paired) | sd of the gain across seeds |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(rows)


def reliability_table(summary: pd.DataFrame) -> str | None:
    """Per run: how far to trust its k-sample estimates, from the same pass (iwae.diagnostics)."""
    done = summary[(summary.status == "done") & summary.get("nll", pd.Series(dtype=float)).notna()]
    if done.empty or "khat_high" not in done:
        return None
    rows = []
    for r in done.itertuples():
        jk_gap = r.nll - r.nll_jk if not pd.isna(r.nll_jk) else math.nan  # NLL from L_k minus NLL from the jackknife
        rows.append(
            f"| {_name(r)} | {int(r.eval_k)} | {int(r.test_images)} | {_fmt(r.nll)} | {_fmt(r.nll_jk)} | {jk_gap:.3f} | "
            f"{r.ess_median:.0f} | {100 * r.khat_high:.1f}% | {r.mcse_mean:.3f} |"
        )
    head = "| run | k | images | NLL from L_k | NLL from the jackknife | L_k - jackknife | median ESS | k-hat > 0.7 | mean MC s.e. |\n" + "|---" * 9 + "|"
    return head + "\n" + "\n".join(rows)


PAPER_TABLE2 = {("vae", 1): (86.76, "19", 84.88, "22"), ("iwae", 50): (84.78, "25", 86.02, "23")}


def table2(summary: pd.DataFrame, ev: pd.DataFrame) -> str | None:
    """The objective swap: each continued run beside the run it started from (paired gain), and
    beside the control that continued the same model with its own objective (paired)."""
    done = summary[summary.status == "done"].set_index("run_id")
    cont = done[done.init_from != ""]
    rows = []
    for rid, r in cont.iterrows():
        if r.init_from not in done.index:
            continue
        s = done.loc[r.init_from]
        swapped = (r.objective, r.k) != (s.objective, s.k)
        gain = paired_gap(ev, str(r.init_from), str(rid))
        ctrl = cont[(cont.init_from == r.init_from) & (cont.objective == s.objective) & (cont.k == s.k) & (cont.epochs == r.epochs)]
        vs = paired_gap(ev, str(ctrl.index[0]), str(rid)) if swapped and len(ctrl) else (math.nan, math.nan, 0)
        paper = PAPER_TABLE2.get((str(s.objective), int(s.k))) if swapped else None
        rows.append(
            f"| {_name(s)} -> {_name(r, origin=False)}{'' if swapped else ' (control)'} | {s.epochs} + {r.epochs} | {_fmt(s.nll, s.nll_se)} ({s.active}) | "
            f"{_fmt(r.nll, r.nll_se)} ({r.active}) | {_fmt(gain[0], gain[1])} | {_fmt(vs[0], vs[1])} | "
            f"{f'{paper[0]:.2f} ({paper[1]}) -> {paper[2]:.2f} ({paper[3]})' if paper else '-'} |"
        )
    if not rows:
        return None
    head = (
        "| first stage -> second stage | epochs | NLL (active) before | NLL (active) after | log p gain (paired) | swap vs control (paired) | paper |\n"
        "|---|---|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(rows)


def gap_table(summary: pd.DataFrame) -> str | None:
    """Train-test gap: test NLL minus train NLL (positive: the model fits its training images better).
    The paper's appendix reports it from the same k=5000 estimate run on the training set."""
    rows = []
    for r in summary[(summary.status == "done") & (summary.train_images.fillna(0) > 0)].itertuples():
        gap = r.nll - r.train_nll
        se = math.sqrt(r.nll_se**2 + r.train_nll_se**2)
        train, test = f"{_fmt(r.train_nll, r.train_nll_se)} ({int(r.train_images)})", f"{_fmt(r.nll, r.nll_se)} ({int(r.test_images)})"
        rows.append(f"| {_name(r)} | {r.epochs} | {train} | {test} | {_fmt(gap, se)} |")
    if not rows:
        return None
    return "| run | epochs | train NLL (images) | test NLL (images) | gap: test - train |\n|---|---|---|---|---|\n" + "\n".join(rows)


def estimator_table(summary: pd.DataFrame, ev: pd.DataFrame) -> str | None:
    """Runs at matched cost (same total samples): every estimator/objective against standard IWAE."""
    done = summary[(summary.status == "done") & (summary.init_from == "")]
    done = done.assign(samples=done.k * done.m)
    rows = []
    # per seed: each estimator against the standard IWAE trained with the same seed
    for (_dataset, _layers, epochs, samples, _seed), g in done.groupby(["dataset", "layers", "epochs", "samples", "seed"], sort=True):
        base = g[(g.objective == "iwae") & (g.estimator == "standard")]
        others = g[(g.estimator != "standard") | g.objective.isin(["miwae", "ciwae", "piwae"])]
        if base.empty or others.empty:
            continue
        b = base.iloc[0]
        rows.append(f"| {_name(b)} | {samples} | {epochs} | {_fmt(b.nll, b.nll_se)} | {b.active} | (reference) |")
        for r in others.itertuples():
            gain = paired_gap(ev, str(b.run_id), str(r.run_id))
            rows.append(f"| {_name(r)} | {samples} | {epochs} | {_fmt(r.nll, r.nll_se)} | {r.active} | {_fmt(gain[0], gain[1])} |")
    if not rows:
        return None
    return "| run | samples/example | epochs | test NLL | active | log p gain vs IWAE (paired) |\n|---|---|---|---|---|---|\n" + "\n".join(rows)


def budget(summary: pd.DataFrame) -> str:
    """What the numbers below rest on: the evaluation (k, images, seed) and the training budget."""
    done = summary[summary.status == "done"]
    evals = sorted({(int(r.eval_k), int(r.test_images), int(r.eval_seed)) for r in done.itertuples() if not pd.isna(getattr(r, "eval_k", math.nan))})
    ev_txt = "; ".join(f"L_k with k={k:,} importance samples on {n:,} test images (seed {s})" for k, n, s in evals) or "not evaluated yet"
    trains = sorted({(int(r.epochs), int(r.train_subset)) for r in done.itertuples()})
    tr_txt = "; ".join(f"{e:,} epochs on {'the first ' + format(n, ',') if n else 'all'} training images" for e, n in trains)
    return f"**Evaluation:** {ev_txt}. **Training:** {tr_txt}. The paper: 3,280 epochs on all 60,000 MNIST training images, k=5,000 on all test images."


def all_runs_table(summary: pd.DataFrame) -> str:
    lines = ["| run | what | epochs | status | test NLL | pruned NLL | active | images | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        err = f" ({r.error})" if r.status != "done" and r.error else ""
        lines.append(
            f"| {r.run_id} | {_name(r)} | {r.epochs} | {r.status}{err} | "
            f"{_fmt(getattr(r, 'nll', math.nan), getattr(r, 'nll_se', math.nan))} | {_fmt(getattr(r, 'nll_pruned', math.nan))} | {r.active} | "
            f"{int(r.test_images) if not pd.isna(getattr(r, 'test_images', math.nan)) else 0} | {_fmt(r.train_seconds)} |"
        )
    return "\n".join(lines)


COLOURS = {"vae": "tab:blue", "iwae": "tab:orange", "miwae": "tab:green", "ciwae": "tab:red", "piwae": "tab:purple"}
STYLES = {"standard": "-", "stl": "--", "dreg": ":"}


def _style(summary: pd.DataFrame) -> dict[str, dict[str, str]]:
    """One colour per objective in every plot, a line style per estimator, a marker per seed."""
    out: dict[str, dict[str, str]] = {}
    for r in summary.itertuples():
        out[str(r.run_id)] = {"color": COLOURS.get(str(r.objective), "tab:gray"), "ls": STYLES.get(str(r.estimator), "-"), "marker": "os^v"[int(r.seed) % 4]}
    return out


def plots(results: Results, summary: pd.DataFrame, out_dir: Path, ev: pd.DataFrame | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    files = []
    train = results.read("train")
    labels = run_labels(summary)
    style = _style(summary)
    if not train.empty:
        fig, ax = plt.subplots(figsize=(7, 4))
        epochs = dict(zip(summary.run_id, summary.epochs))
        start = {r: epochs.get(src, 0) for r, src in zip(summary.run_id, summary.init_from) if src}  # continued runs
        for rid, g in sorted(train.groupby("run_id"), key=lambda t: labels.get(str(t[0]), str(t[0]))):  # legend in name order
            st = style.get(str(rid), {})
            ax.plot(
                g["epoch"] + start.get(rid, 0),
                g["train_bound"],
                ms=3,
                color=st.get("color"),
                ls=st.get("ls", "-"),
                marker=st.get("marker", "o"),
                label=labels.get(rid, rid),
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        ax.set_xlabel("epoch")
        ax.set_ylabel("training bound (nats)")
        ax.set_title("Training curves")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes: a dozen runs would cover the lines
        files.append(_save(fig, out_dir / "training_curves.png"))
    done = summary[summary.status == "done"].sort_values("run_id", key=lambda ids: ids.map(labels))
    if "nll_l1" in done and done["nll_l1"].notna().any():
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in done.itertuples():
            ks = [p for p in PREFIXES if not math.isnan(getattr(r, f"nll_l{p}"))]
            st = style.get(str(r.run_id), {})
            ax.plot(
                ks, [-getattr(r, f"nll_l{p}") for p in ks], color=st.get("color"), ls=st.get("ls", "-"), marker=st.get("marker", "o"), label=labels[r.run_id]
            )
        ax.set_xscale("log")
        ax.set_xlabel("k (importance samples at test time)")
        ax.set_ylabel("mean test L_k (nats)")
        ax.set_title("L_k against k, from the prefix bounds of one pass")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes: a dozen runs would cover the lines
        files.append(_save(fig, out_dir / "lk_vs_k.png"))
    var_rows = done[done["unit_var_h1"].notna()].iloc[::-1]  # one row per run, the first name at the top
    if len(var_rows):
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * len(var_rows)))
        jitter = np.random.default_rng(0)
        for y, r in enumerate(var_rows.itertuples()):
            var = np.asarray(r.unit_var_h1, dtype=float)
            x = np.log10(np.clip(var, 1e-12, None))
            ax.scatter(x, y + jitter.uniform(-0.25, 0.25, len(x)), s=6, alpha=0.7, color=style.get(str(r.run_id), {}).get("color"))
            _note_right(ax, y, f"{int(r.active_h1)}/{len(var)}")  # the count the tables give
        ax.set_yticks(range(len(var_rows)), [labels[str(r.run_id)] for r in var_rows.itertuples()], fontsize=7)
        ax.axvline(np.log10(UNIT_THRESHOLD), color="k", ls="--", lw=1)
        ax.set_xlabel("log10 variance of the posterior mean, one dot per unit (layer 1); active if >= -2", fontsize=8)
        ax.set_title("Active units (paper sec. 5.2, App. C; right: active / all)", fontsize=9)
        files.append(_save(fig, out_dir / "active_units.png"))
    if ev is not None and "khat" in ev and ev["khat"].notna().any():
        # one box per run, named on its row (overlaid histograms of a dozen runs cannot be told apart)
        finite = ev[np.isfinite(ev["khat"])]
        per_run = sorted(
            ((labels.get(str(rid), str(rid)), str(rid), g.loc[g.eval_k == g.eval_k.max(), "khat"].to_numpy()) for rid, g in finite.groupby("run_id")),
            reverse=True,  # the first name at the top
        )
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * len(per_run)))
        box = ax.boxplot(
            [v for _, _, v in per_run],
            orientation="horizontal",
            tick_labels=[n for n, _, _ in per_run],
            whis=(5, 95),
            showfliers=False,
            patch_artist=True,
            medianprops={"color": "k"},
        )
        for patch, (_, rid, _) in zip(box["boxes"], per_run):
            patch.set_facecolor(style.get(rid, {}).get("color", "tab:gray"))
            patch.set_alpha(0.6)
        high = dict(zip(summary.run_id.astype(str), summary.khat_high))  # the share the reliability table gives
        for y, (_, rid, _) in enumerate(per_run, start=1):
            _note_right(ax, y, f"{high.get(rid, math.nan):.1%}")
        ax.axvline(KHAT_UNRELIABLE, color="k", ls="--", lw=1)
        ax.set_xlabel("Pareto k-hat of an image's importance weights (box: quartiles, whiskers: 5-95%; > 0.7: unreliable)", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title("Reliability of the per-image estimates (right: share of images above 0.7)", fontsize=9)
        files.append(_save(fig, out_dir / "khat.png"))
    return files


def _note_right(ax: Any, y: float, text: str) -> None:
    """A run's figure just right of the axes, on its row."""
    ax.annotate(text, (1.0, y), xycoords=("axes fraction", "data"), xytext=(4, 0), textcoords="offset points", va="center", fontsize=7)


def _save(fig: object, path: Path) -> Path:
    """Render a figure into the report's private temporary folder (build_report then writes each
    file whole into the report's location through the store)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    import matplotlib.pyplot as plt

    plt.close(fig)  # type: ignore[arg-type]
    return path


def build_report(results: Results, out: str | Path | None = None) -> Report:
    """Render the report into ``out`` (default ``RESULTS/report``, a folder or a URI): report.md, PNGs, summary.parquet."""
    dest = Store.open(out) if out is not None else results.store.sub("report")
    summary = run_summary(results)
    ev = results.read("eval")
    if summary.empty:
        return Report("No runs in this results folder yet.", summary, ())
    with tempfile.TemporaryDirectory(prefix="iwae-report-") as tmp:
        md, files = _render(results, summary, ev, Path(tmp))
        for f in files:
            dest.write_bytes(f.name, f.read_bytes())
        return Report(md, summary, tuple(dest.uri(f.name) for f in files))


def _render(results: Results, summary: pd.DataFrame, ev: pd.DataFrame, out_dir: Path) -> tuple[str, list[Path]]:
    """Write report.md, the PNGs and summary.parquet into a local folder; returns the markdown and files."""
    parts = ["# iwae-pipeline report", "", budget(summary), "", "## Table 1: VAE vs IWAE (test NLL in nats ± standard error; lower is better)", ""]
    parts += [table1(summary, ev), ""]
    parts += [
        "NLL: minus the mean over test images of L_k (k as stated above), ± its standard error. Active: units whose posterior mean"
        " varies (variance ≥ 0.01 over the first 500 training images, paper sec. 5.2); a+b counts layers 1 and 2.",
        "IWAE gain: mean over test images of log p_IWAE(x) - log p_VAE(x) with its paired standard error (positive favours IWAE).",
        "At k=1 the IWAE bound is the ELBO, so one model fills both columns (as in the paper).",
        "Paper columns: NLL (active units) after 3,280 epochs on all 60,000 training images, k=5000 on all 10,000 test images"
        " (Burda et al. 2016, Table 1). Compare only runs with the same budget.",
        "",
    ]
    ts = seed_table(summary, ev)
    if ts:
        parts += [
            "## Seeds: the objective's effect against the seed's",
            "",
            ts,
            "",
            "sd: standard deviation across seeds. A paired gain's standard error covers the test images of one seed only;"
            " when the gain's spread across seeds exceeds it, one seed does not settle the sign.",
            "",
        ]
    tr = reliability_table(summary)
    if tr:
        parts += [
            "## How far each estimate can be trusted (per test image, from the same k-sample pass)",
            "",
            tr,
            "",
            "L_k is a lower bound biased low by O(1/k); the first-order jackknife (Nowozin 2018) removes the leading term, so"
            " 'L_k - jackknife' (in NLL) is the estimated bias left at this k. ESS: Kish's effective sample size of the k weights."
            " k-hat: PSIS Pareto shape of the largest weights (Vehtari et al. 2024); above 0.7 an image's estimate is unreliable"
            " whatever k. MC s.e.: the Monte Carlo standard error of one image's L_k (delta method). The headline stays L_k.",
            "",
        ]
    t2 = table2(summary, ev)
    if t2:
        parts += [
            "## Table 2: objective swap (Burda et al. 2016, sec. 5.2)",
            "",
            t2,
            "",
            "Gain: log p after minus before, per test image. Swap vs control: the swapped run minus the same model continued"
            " with its own objective for as long (positive: the new objective helped more than more of the old one).",
            "",
        ]
    te = estimator_table(summary, ev)
    if te:
        parts += ["## Estimators and bounds at matched cost", "", te, ""]
    tg = gap_table(summary)
    if tg:
        parts += [
            "## Train-test gap (k=5000 on the first training images against the test set)",
            "",
            tg,
            "",
            "Different images, so the standard error is unpaired. Paper: 0.62-0.79 nats on MNIST after 3,280 epochs, on all of train.",
            "",
        ]
    ais, bdmc = results.read("ais"), results.read("bdmc")
    ta = ais_table(summary, ev, ais, bdmc)
    if ta:
        parts += [
            "## How far is L_5000 from log p(x)? AIS and BDMC (iwae.ais)",
            "",
            ta,
            "",
            "On the same test images (binarised alike): AIS anneals from the encoder to the posterior over T temperatures with HMC"
            " (Wu et al. 2017; Cremer et al. 2018); its log-mean-exp over chains is a stochastic lower bound on log p(x) that tightens"
            " as T grows, so rows with more temperatures are the better estimate. 'AIS - L_5000': how much L_5000 understates log p(x)"
            " (positive: AIS is higher); 'jackknife - L_5000': what the jackknife predicted. BDMC gap: upper minus lower bound on images"
            " simulated from the model (Grosse et al. 2015), which bounds AIS's own error there.",
            "",
        ]
        tconv = ais_convergence_table(summary, ais)
        if tconv:
            parts += ["Convergence: each run's AIS as T doubles, on the images both settings scored:", "", tconv, ""]
        tgain = ais_gain_table(summary, ev, ais)
        if tgain:
            parts += ["The IWAE gain measured each way (on the images both runs' AIS scored, the setting with the most images):", "", tgain, ""]
    parts += ["## Findings: the paper's claims at this budget", "", findings(summary, ev, ais), ""]
    parts += [
        "Verdicts: a log-likelihood claim 'holds' when the gain (each image's gain averaged over seeds) clears zero by two"
        " standard errors over images and, with two or more seeds, the per-seed gains clear it by Student's t at 95%;"
        " 'contradicted' likewise on the other side; one seed says so. Unit claims need every run (or pair) to agree;"
        " the pruning claim needs every run within 0.06 nats by two standard errors. Otherwise: not resolved at this budget."
        " Claim (1) 'by AIS' is the same test on the AIS estimates of the first test images, where every run of the cell has them.",
        "",
    ]
    parts += [
        "## All runs",
        "",
        all_runs_table(summary),
        "",
        "Test NLL: minus the mean L_k over the images scored ('images'), ± standard error. Pruned NLL: the same with the inactive"
        " units removed (paper sec. 5.2: it should barely move). Active: units with posterior-mean variance ≥ 0.01."
        " Train s: wall seconds of training.",
        "",
    ]
    failed = summary[summary.status != "done"]
    if len(failed):
        parts += [f"**{len(failed)} run(s) failed**: " + ", ".join(f"{r.run_id} ({r.label})" for r in failed.itertuples()), ""]
    files = plots(results, summary, out_dir, ev)
    parts += [f"![{p.stem}]({p.name})" for p in files]
    md = "\n".join(parts) + "\n"
    (out_dir / "report.md").write_text(md)
    flat = summary.drop(columns=[c for c in ("unit_var_h1", "unit_var_h2") if c in summary])
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pandas(flat, preserve_index=False), out_dir / "summary.parquet")
    return md, [out_dir / "report.md", *files, out_dir / "summary.parquet"]


# ---------------------------------------------------------------------------------------- AIS and findings


AIS_SETTING = ["ais_steps", "ais_chains", "ais_leapfrog", "ais_seed"]


def _l5000(ev: pd.DataFrame, run_id: str, eval_seed: float | None = None) -> pd.DataFrame:
    """A run's headline k-sample rows (largest k; the binarisation seed AIS used, when given), by image id."""
    e = ev[ev.run_id == run_id]
    if eval_seed is not None and not pd.isna(eval_seed) and "eval_seed" in e:
        e = e[e.eval_seed == eval_seed]
    e = e[e.eval_k == e.eval_k.max()] if len(e) else e
    return e.drop_duplicates("image_id").set_index("image_id")


def _setting_rows(df: pd.DataFrame, setting: tuple[Any, ...], run_id: str | None = None) -> pd.DataFrame:
    """The rows at one AIS setting (T, chains, leapfrog, seed), of one run when ``run_id`` is given."""
    sel = np.logical_and.reduce([df[c] == x for c, x in zip(AIS_SETTING, setting)])
    return df[sel & (df.run_id == run_id)] if run_id is not None else df[sel]


def ais_vs_lk(ev: pd.DataFrame, ais: pd.DataFrame, bdmc: pd.DataFrame, run_id: str, setting: tuple[Any, ...]) -> dict[str, Any]:
    """One run at one AIS setting, on the test images that AIS and the largest-k L_k (with the
    binarisation seed AIS used) both scored, paired per image: the NLL from L_k, its jackknife and
    AIS; ``gap`` = AIS - L_k (positive: L_k understates log p(x)) and what the jackknife predicted of
    it; BDMC's upper - lower gap on images simulated from the model. NaN where there is nothing."""
    a = _setting_rows(ais, setting, run_id).drop_duplicates("image_id").set_index("image_id")
    e = _l5000(ev, run_id, a.eval_seed.iloc[0] if len(a) else None)
    both = a.index.intersection(e.index)
    lk, jk, la = e.log_px.reindex(both), e.log_px_jk.reindex(both), a.log_px_ais.reindex(both)
    d, j = (la - lk).dropna(), (jk - lk).dropna()
    b = _setting_rows(bdmc, setting, run_id)
    bgap = b.log_px_upper - b.log_px_ais
    return {
        "images": len(both),
        "k": int(e.eval_k.iloc[0]) if len(e) else 0,
        "nll_lk": float(-lk.mean()) if len(both) else math.nan,
        "nll_jk": float(-jk.mean()) if len(both) else math.nan,
        "nll_ais": float(-la.mean()) if len(both) else math.nan,
        "gap": float(d.mean()) if len(d) else math.nan,
        "gap_se": _se(d),
        "jackknife": float(j.mean()) if len(j) else math.nan,
        "bdmc_gap": float(bgap.mean()) if len(b) else math.nan,
        "bdmc_gap_se": _se(bgap),
        "bdmc_images": len(b),
        "accept": float(a.accept.mean() if len(a) else b.accept.mean()) if len(a) or len(b) else math.nan,
        "seconds_per_image": float(a.seconds.mean() if len(a) else b.seconds.mean()) if len(a) or len(b) else math.nan,
    }


def ais_table(summary: pd.DataFrame, ev: pd.DataFrame, ais: pd.DataFrame, bdmc: pd.DataFrame) -> str | None:
    """Per run and AIS setting, on the same test images (:func:`ais_vs_lk`): L_k, its jackknife, AIS
    (iwae.ais), how far L_k is below AIS (paired) against what the jackknife predicted, and BDMC's
    gap on simulated data."""
    if ais.empty and bdmc.empty:
        return None
    names = {str(r.run_id): _name(r) for r in summary.itertuples()}
    keys = sorted(set(map(tuple, ais[["run_id", *AIS_SETTING]].values.tolist())) | set(map(tuple, bdmc[["run_id", *AIS_SETTING]].values.tolist())))
    rows = []
    for rid, *setting in keys:
        r = ais_vs_lk(ev, ais, bdmc, str(rid), tuple(setting))
        t, c, lf, _ = setting
        has = r["images"] > 0
        cells = [
            names.get(str(rid), str(rid)),
            f"{t} / {c} / {lf}",
            str(r["images"]),
            f"{_fmt(r['nll_lk'])} (k={r['k']})" if has else "-",
            _fmt(r["nll_jk"]) if has else "-",
            _fmt(r["nll_ais"]) if has else "-",
            _fmt(r["gap"], r["gap_se"]) if has else "-",
            _fmt(r["jackknife"]) if has else "-",
            f"{_fmt(r['bdmc_gap'], r['bdmc_gap_se'])} ({r['bdmc_images']})" if r["bdmc_images"] else "-",
            f"{r['accept']:.2f}",
            f"{r['seconds_per_image']:.2f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    head = (
        "| run | T / chains / leapfrog | images | NLL from L_k | NLL from the jackknife | NLL from AIS | AIS - L_k (paired) |"
        " jackknife - L_k | BDMC gap (simulated images) | acceptance | s per image |\n" + "|---" * 11 + "|"
    )
    return head + "\n" + "\n".join(rows)


def _at(df: pd.DataFrame, setting: tuple[Any, ...]) -> pd.Series:
    """One AIS setting's estimates, by image id."""
    return _setting_rows(df, setting).drop_duplicates("image_id").set_index("image_id").log_px_ais


def ais_convergence_table(summary: pd.DataFrame, ais: pd.DataFrame) -> str | None:
    """Per run, AIS at each T against the next larger T with the same chains, leapfrog and seed, on the
    images both scored, paired: an estimate that has converged stops moving as T grows."""
    if ais.empty:
        return None
    names = {str(r.run_id): _name(r) for r in summary.itertuples()}
    rows = []
    for (rid, c, lf, seed), g in ais.groupby(["run_id", "ais_chains", "ais_leapfrog", "ais_seed"], sort=True):
        ts = sorted(set(g.ais_steps))
        for small, large in zip(ts, ts[1:]):
            a, b = _at(g, (small, c, lf, seed)), _at(g, (large, c, lf, seed))
            both = a.index.intersection(b.index)
            if len(both) < 2:
                continue
            d = b.reindex(both) - a.reindex(both)
            cells = [
                names.get(str(rid), str(rid)),
                f"{small} → {large}",
                str(len(both)),
                _fmt(-float(a.reindex(both).mean())),
                _fmt(-float(b.reindex(both).mean())),
            ]
            rows.append("| " + " | ".join([*cells, _fmt(float(d.mean()), _se(d))]) + " |")
    if not rows:
        return None
    head = "| run | T | images | NLL from AIS at the smaller T | at the larger T | log p̂ change (paired) |\n" + "|---" * 6 + "|"
    return head + "\n" + "\n".join(rows)


def ais_gain_table(summary: pd.DataFrame, ev: pd.DataFrame, ais: pd.DataFrame) -> str | None:
    """The IWAE gain over the VAE measured each way, per pair, on the images both runs' AIS scored with
    one setting (the one with the most images, then the largest T), paired per image."""
    if ais.empty:
        return None
    rows = []
    for v, i in _pairs(summary):
        av, ai = ais[ais.run_id == v.run_id], ais[ais.run_id == i.run_id]
        shared = set(map(tuple, av[AIS_SETTING].values.tolist())) & set(map(tuple, ai[AIS_SETTING].values.tolist()))
        if not shared:
            continue
        setting = max(shared, key=lambda st: (len(_at(av, st).index.intersection(_at(ai, st).index)), st))  # most images, then largest T

        d_ais = (_at(ai, setting) - _at(av, setting)).dropna()
        if len(d_ais) < 2:
            continue
        ids = d_ais.index
        d_is = (_l5000(ev, str(i.run_id)).log_px.reindex(ids) - _l5000(ev, str(v.run_id)).log_px.reindex(ids)).dropna()
        by_is, by_ais = _fmt(float(d_is.mean()), _se(d_is)), _fmt(float(d_ais.mean()), _se(d_ais))
        rows.append(f"| {v.dataset} | {v.layers} | {v.k} | {v.epochs} | {v.seed} | T={setting[0]} | {len(ids)} | {by_is} | {by_ais} |")
    if not rows:
        return None
    head = "| data | layers | k | epochs | seed | AIS | images | IWAE gain by L_k | IWAE gain by AIS |\n|---|---|---|---|---|---|---|---|---|"
    return head + "\n" + "\n".join(rows)


NR = "not resolved at this budget"
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # Student t, two-sided 95%, by d.o.f.


def _signs(values: list[int], sign: int = 1) -> str:
    """'holds' when every value has the sign, 'contradicted' when every one has the other."""
    return "holds" if all(sign * v > 0 for v in values) else "contradicted" if all(sign * v < 0 for v in values) else NR


def _se(x: pd.Series) -> float:
    x = x.dropna()
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan


def _verdict(mean: float, se: float, threshold: float = 0.0) -> str:
    """'holds' when mean - 2 se > threshold, 'contradicted' when mean + 2 se < threshold."""
    if math.isnan(mean) or math.isnan(se):
        return NR
    if mean - 2 * se > threshold:
        return "holds"
    if mean + 2 * se < threshold:
        return "contradicted"
    return NR


def _flip(verdict: str) -> str:
    """A verdict on "goes up" read as one on "goes down": holds and contradicted swap, and a qualifier
    such as "(one seed only)" stays."""
    head, sep, tail = verdict.partition(" (")
    return {"holds": "contradicted", "contradicted": "holds"}.get(head, head) + sep + tail


def _gain(ev: pd.DataFrame, pairs: list[tuple[str, str]], value: Callable[[str], pd.Series] | None = None) -> tuple[str, str]:
    """A gain log p_b - log p_a over seeds: (figure, verdict). Each image's gain is averaged over the
    seeds (they share the test images), its standard error taken over images; with two or more seeds
    the per-seed means must also clear zero by Student's t (the seeds' spread usually dominates);
    with one seed the verdict says so. ``value``: a run's log p(x) by image id (default: its L_k)."""
    value = value or (lambda rid: _headline(ev, rid))
    per = [(value(b) - value(a)).dropna() for a, b in pairs]
    per = [d for d in per if len(d) > 1]
    if not per:
        return "no evaluated pair", NR
    d = pd.concat(per, axis=1).mean(axis=1).dropna()
    m, se = float(d.mean()), _se(d)
    fig = f"{_fmt(m, se)} nats"
    verdict = _verdict(m, se)
    if len(per) == 1:
        return f"{fig} (one seed)", verdict if verdict == NR else f"{verdict} (one seed only)"
    means = [float(x.mean()) for x in per]
    half = T975.get(len(means) - 1, 2.0) * float(np.std(means, ddof=1)) / math.sqrt(len(means))
    fig += f"; per seed {', '.join(f'{x:+.2f}' for x in means)} (95% t-interval ± {half:.2f})"
    if verdict == "holds" and m - half <= 0 or verdict == "contradicted" and m + half >= 0:
        verdict = NR
    return fig, verdict


def _pairs(summary: pd.DataFrame) -> list[tuple[Any, Any]]:
    """(VAE, IWAE) rows trained alike (dataset, layers, k, epochs, seed), from scratch."""
    done = summary[(summary.status == "done") & (summary.estimator == "standard") & (summary.init_from == "")]
    out = []
    for _, g in done.groupby(["dataset", "layers", "k", "epochs", "seed"], sort=True):
        v, i = g[g.objective == "vae"], g[g.objective == "iwae"]
        if len(v) and len(i):
            out.append((v.iloc[0], i.iloc[0]))
    return out


def _active(r: Any) -> int:
    return int(r.active_h1) + (int(r.active_h2) if not pd.isna(r.active_h2) else 0)


def _ais_by_image(ais: pd.DataFrame, run_ids: list[str]) -> tuple[Callable[[str], pd.Series], tuple[Any, ...], int] | None:
    """One AIS setting that scored every run of ``run_ids`` (the most images shared, then the largest T):
    a run's AIS log p(x) by image id under it, on exactly the images every run shares (so a seed with
    more images does not enter the pooled gain on its own), the setting, and the number of images."""
    by_run = [ais[ais.run_id == rid] for rid in run_ids]
    settings = set.intersection(*(set(map(tuple, a[AIS_SETTING].values.tolist())) for a in by_run)) if by_run else set()
    if not settings:
        return None

    def shared(st: tuple[Any, ...]) -> pd.Index:
        return functools.reduce(lambda ix, a: ix.intersection(_at(a, st).index), by_run[1:], _at(by_run[0], st).index)

    best = max(settings, key=lambda st: (len(shared(st)), st))
    images = shared(best)
    return (lambda rid: _at(ais[ais.run_id == rid], best).reindex(images)), best, len(images)


def findings(summary: pd.DataFrame, ev: pd.DataFrame, ais: pd.DataFrame | None = None) -> str:
    """The paper's claims, each with our figure, its error and spread, and a verdict from the data.
    Claim (1) is also judged by AIS where every run of a cell has AIS estimates: L_k understates log
    p(x) by more for the IWAE than for the VAE (the AIS section), so the two can disagree."""
    pairs = _pairs(summary)
    out = ["| claim (Burda et al. 2016) | our figure | verdict |", "|---|---|---|"]
    # (1) IWAE reaches a better test log-likelihood than the VAE at k = 5 and 50: per cell, pooled over seeds
    for k in (5, 50):
        cells: dict[tuple[Any, ...], list[tuple[str, str]]] = {}
        for v, i in pairs:
            if int(v.k) == k:
                cells.setdefault((v.dataset, int(v.layers), int(v.epochs)), []).append((str(v.run_id), str(i.run_id)))
        for (dataset, layers, epochs), ids in sorted(cells.items()) or [(("-", 0, 0), [])]:
            claim = f"(1) IWAE beats the VAE in test log-likelihood at k={k}" + (f" ({dataset}, {layers} layer(s), {epochs} epochs)" if ids else "")
            fig, verdict = _gain(ev, ids) if ids else ("no pair", NR)
            out.append(f"| {claim} | {fig} | {verdict} |")
            by_ais = _ais_by_image(ais, [r for pair in ids for r in pair]) if ids and ais is not None and len(ais) else None
            if by_ais is not None:
                value, setting, n = by_ais
                fig, verdict = _gain(ev, ids, value)
                out.append(f"| {claim}, by AIS (T={setting[0]}, {n} images) | {fig} | {verdict} |")
    # (2) IWAE uses more active units
    diffs = [_active(i) - _active(v) for v, i in pairs if int(v.k) > 1]
    fig = f"{np.mean(diffs):+.1f} units over {len(diffs)} pair(s) (range {min(diffs):+d} to {max(diffs):+d})" if diffs else "no pair"
    out.append(f"| (2) IWAE has more active units (k > 1) | {fig} | {_signs(diffs) if diffs else NR} |")
    # (3) a VAE trained further with the IWAE objective gains log p and active units; the reverse loses
    # both: each swapped run against the same model continued with its own objective for as long
    done = summary[summary.status == "done"].set_index("run_id")
    cont = done[done.init_from != ""]
    for src, dst, want in (("vae", "iwae", 1), ("iwae", "vae", -1)):
        claim = f"(3) {src.upper()} continued as {dst.upper()}: log p and active units go {'up' if want > 0 else 'down'} (against its control)"
        swaps, du = [], []
        for rid, r in cont[cont.objective == dst].iterrows():
            if r.init_from not in done.index or done.loc[r.init_from].objective != src:
                continue
            ctrl = cont[(cont.init_from == r.init_from) & (cont.objective == src) & (cont.epochs == r.epochs)]
            if len(ctrl):
                swaps.append((str(ctrl.index[0]), str(rid)))
                du.append(_active(r) - _active(ctrl.iloc[0]))
        if not swaps:
            out.append(f"| {claim} | no swapped run with its control | {NR} |")
            continue
        fig, v_nll = _gain(ev, swaps)
        v_nll = v_nll if want > 0 else _flip(v_nll)
        v_units = _signs(du, want)
        verdict = "holds" if v_nll.startswith("holds") and v_units == "holds" else "contradicted" if "contradicted" in (v_nll[:12], v_units) else NR
        out.append(f"| {claim} | log p {fig}; units {', '.join(f'{d:+d}' for d in du)} | {verdict} (log p: {v_nll}; units: {v_units}) |")
    # (4) removing the inactive units changes the NLL by less than 0.06 nats, in every run
    moves = []
    for r in summary[summary.status == "done"].itertuples():
        e = _l5000(ev, str(r.run_id))
        d = (e.log_px_pruned - e.log_px).dropna() if "log_px_pruned" in e else pd.Series(dtype=float)
        if len(d) > 1:
            moves.append((abs(float(d.mean())), _se(d), _name(r)))
    if moves:
        worst = max(moves)
        fig = f"largest: {worst[0]:.3f} ± {worst[1]:.3f} ({worst[2]}) over {len(moves)} run(s)"
        verdict = "holds" if all(m + 2 * se < 0.06 for m, se, _ in moves) else "contradicted" if any(m - 2 * se > 0.06 for m, se, _ in moves) else NR
    else:
        fig, verdict = "no pruned evaluation", NR
    out.append(f"| (4) pruning inactive units moves the NLL by < 0.06 nats | {fig} | {verdict} |")
    # (5) in the two-layer models the second layer keeps fewer than 10 active units
    h2 = [int(x) for x in summary[(summary.status == "done") & (summary.layers == 2) & summary.active_h2.notna()].active_h2]
    fig = f"{', '.join(map(str, h2))} over {len(h2)} run(s)" if h2 else "no two-layer run"
    out.append(f"| (5) two-layer models: fewer than 10 active units in layer 2 | {fig} | {_signs([10 - h for h in h2]) if h2 else NR} |")
    return "\n".join(out)
