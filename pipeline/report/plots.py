"""The report's PNG plots, from a loaded summary.

Up to :data:`MANY` runs a plot shows every run (a line, a row of dots, a box each). Beyond that it
shows groups (:func:`group_of`: dataset, layers, objective, k, estimator), their medians and spreads,
so a grid of thousands of runs gives figures of the same size as a grid of forty, readable and under
Agg's 2^16-pixel limit."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from iwae.diagnostics import KHAT_UNRELIABLE
from iwae.units import THRESHOLD as UNIT_THRESHOLD
from pipeline.report.summary import Loaded
from pipeline.report.tables import run_labels
from pipeline.store.results import PREFIXES

COLOURS = {"vae": "tab:blue", "iwae": "tab:orange", "miwae": "tab:green", "ciwae": "tab:red", "piwae": "tab:purple"}
STYLES = {"standard": "-", "stl": "--", "dreg": ":"}


def _style(summary: pd.DataFrame) -> dict[str, dict[str, str]]:
    """One colour per objective in every plot, a line style per estimator, a marker per seed."""
    out: dict[str, dict[str, str]] = {}
    for r in summary.itertuples():
        out[str(r.run_id)] = {"color": COLOURS.get(str(r.objective), "tab:gray"), "ls": STYLES.get(str(r.estimator), "-"), "marker": "os^v"[int(r.seed) % 4]}
    return out


MANY = 24  # beyond this many runs, plots show groups of runs, not runs
MAX_GROUPS = 30  # the largest groups shown, one row or line each


def group_of(summary: pd.DataFrame) -> dict[str, str]:
    """Each run's group in the aggregated plots: what it is, without its seed and schedule."""
    out = {}
    for r in summary.itertuples():
        est = "" if str(r.estimator) == "standard" else f" {r.estimator}"
        out[str(r.run_id)] = f"{r.dataset} L{r.layers} {str(r.objective).upper()} k={r.k}{est}"
    return out


def plots(loaded: Loaded, out_dir: Path) -> list[Path]:
    """The report's PNGs in ``out_dir``: training curves, L_k against k, active units, k-hat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if len(loaded.summary) > MANY:
        return aggregated(loaded, out_dir)
    files = []
    summary, train = loaded.summary, loaded.train
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
    heads = {str(r.run_id): str(r.estimate) for r in done.itertuples() if r.estimate}
    khats = {rid: loaded.values(rid, est).khat.dropna().to_numpy() for rid, est in heads.items()}
    khats = {rid: v[np.isfinite(v)] for rid, v in khats.items() if len(v)}
    if khats:
        # one box per run (its headline estimate), named on its row (overlaid histograms of a dozen runs cannot be told apart)
        per_run = sorted(((labels.get(rid, rid), rid, v) for rid, v in khats.items()), reverse=True)  # the first name at the top
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


def aggregated(loaded: Loaded, out_dir: Path) -> list[Path]:
    """The same four plots for a grid of many runs, by group (module docstring): median training
    curve with its interquartile band, mean L_k against k, active units and k-hat as one box per group."""
    import matplotlib.pyplot as plt

    files = []
    summary, train = loaded.summary, loaded.train
    groups = group_of(summary)
    done = summary[summary.status == "done"].assign(group=lambda d: d.run_id.astype(str).map(groups))
    sizes = done.group.value_counts()
    shown = sorted(sizes.index[:MAX_GROUPS])
    colour = {g: plt.get_cmap("tab20")(i % 20) for i, g in enumerate(shown)}
    note = f" ({len(shown)} of {len(sizes)} groups, the largest)" if len(sizes) > len(shown) else ""
    if not train.empty:
        t = train.assign(group=train.run_id.astype(str).map(groups))
        t = t[t.group.isin(shown)]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for g, d in t.groupby("group", sort=True):
            q = d.groupby("epoch").train_bound.quantile([0.25, 0.5, 0.75]).unstack()
            ax.plot(q.index, q[0.5], color=colour[str(g)], label=f"{g} ({sizes.get(g, 0)} runs)")
            ax.fill_between(q.index, q[0.25], q[0.75], color=colour[str(g)], alpha=0.2, lw=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training bound (nats)")
        ax.set_title(f"Training curves: median and interquartile range per group{note}", fontsize=9)
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
        files.append(_save(fig, out_dir / "training_curves.png"))
    if "nll_l1" in done and done["nll_l1"].notna().any():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for g, d in done[done.group.isin(shown)].groupby("group", sort=True):
            ks = [p for p in PREFIXES if d[f"nll_l{p}"].notna().any()]
            ax.errorbar(
                ks, [-d[f"nll_l{p}"].mean() for p in ks], yerr=[d[f"nll_l{p}"].std(ddof=0) for p in ks], color=colour[str(g)], marker="o", ms=3, label=g
            )
        ax.set_xscale("log")
        ax.set_xlabel("k (importance samples at test time)")
        ax.set_ylabel("mean test L_k (nats), ± sd over the group's runs")
        ax.set_title(f"L_k against k per group{note}", fontsize=9)
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
        files.append(_save(fig, out_dir / "lk_vs_k.png"))
    units = done[done.group.isin(shown) & done.active_h1.notna()]
    if len(units):
        files.append(
            _boxes(
                [(g, d.active_h1.to_numpy(dtype=float)) for g, d in units.groupby("group", sort=True)],
                colour,
                "active units in layer 1, one value per run",
                f"Active units per group (paper sec. 5.2){note}",
                out_dir / "active_units.png",
            )
        )
    per_group: dict[str, list[np.ndarray]] = {}
    for r in done[done.group.isin(shown)].itertuples():
        if r.estimate:
            v = loaded.values(str(r.run_id), str(r.estimate)).khat.dropna().to_numpy()
            per_group.setdefault(str(r.group), []).append(v[np.isfinite(v)])
    boxes = [(g, np.concatenate(v)) for g, v in sorted(per_group.items()) if sum(len(x) for x in v)]
    if boxes:
        files.append(
            _boxes(
                boxes,
                colour,
                "Pareto k-hat of an image's importance weights, every image of the group's runs (> 0.7: unreliable)",
                f"Reliability of the per-image estimates per group{note}",
                out_dir / "khat.png",
                KHAT_UNRELIABLE,
            )
        )
    return files


def _boxes(boxes: list[tuple[str, np.ndarray]], colour: dict[str, Any], xlabel: str, title: str, path: Path, line: float | None = None) -> Path:
    """One horizontal box per group (quartiles, 5-95% whiskers), the first group at the top, its count on the right."""
    import matplotlib.pyplot as plt

    boxes = sorted(boxes, reverse=True)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * len(boxes)))
    box = ax.boxplot([v for _, v in boxes], orientation="horizontal", tick_labels=[g for g, _ in boxes], whis=(5, 95), showfliers=False,
                     patch_artist=True, medianprops={"color": "k"})  # fmt: skip
    for patch, (g, _v) in zip(box["boxes"], boxes):
        patch.set_facecolor(colour.get(g, "tab:gray"))
        patch.set_alpha(0.6)
    for y, (_, v) in enumerate(boxes, start=1):
        _note_right(ax, y, f"n={len(v):,}")
    if line is not None:
        ax.axvline(line, color="k", ls="--", lw=1)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


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
