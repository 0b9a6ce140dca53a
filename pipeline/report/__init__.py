"""Reports from the Parquet results alone: Table 1 with the paper's numbers beside ours, the seed,
objective-swap, estimator, train-test and AIS tables, the Findings, and PNG plots.

Split by what it does: :mod:`.summary` loads once (through the one reader of estimates),
:mod:`.stats` holds the statistics, :mod:`.tables` and :mod:`.ais` the tables, :mod:`.findings` the
claims, :mod:`.plots` the figures; this module renders them into a folder or a URI. Errors are
standard errors of the mean over images; comparisons of two runs on the same images are paired.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from pipeline.report.ais import ais_convergence_table, ais_gain_table, ais_table, ais_vs_lk
from pipeline.report.findings import NR, findings, flip
from pipeline.report.models import densities_note, model_pairs_table, models_table
from pipeline.report.pictures import PICTURES, pictures
from pipeline.report.plots import plots
from pipeline.report.summary import Loaded, load
from pipeline.report.tables import (
    PAPER_TABLE1,
    all_runs_table,
    budget,
    estimator_table,
    gap_table,
    reliability_table,
    run_labels,
    seed_table,
    table1,
    table1_cells,
    table2,
)
from pipeline.store.objects import Store
from pipeline.store.results import Results

__all__ = ["NR", "PAPER_TABLE1", "Loaded", "Report", "ais_vs_lk", "build_report", "findings", "flip", "load", "run_labels"]


@dataclass(frozen=True)
class Report:
    markdown: str
    summary: pd.DataFrame
    files: tuple[str, ...]  # where each file was written (a path or a URI)


def build_report(results: Results, out: str | Path | None = None, data: Any = None, pictures_of: int = PICTURES) -> Report:
    """Render the report into ``out`` (default ``RESULTS/report``; a folder or a URI, opened through
    :meth:`Store.open`): report.md, PNGs, summary.parquet. ``data`` (a
    :class:`~pipeline.datasource.DataSource`): where the test images shown beside their
    reconstructions come from (without it, the pictures show samples only). ``pictures_of``: how many
    runs get a picture (Table 1's first: each reads a final checkpoint)."""
    dest = Store.open(out) if out is not None else results.store.sub("report")
    loaded = load(results)
    if loaded.summary.empty and not len(loaded.models):
        return Report("No runs in this results folder yet.", loaded.summary, ())
    have = frozenset(k for k in dest.list("", ".png") if "/" not in k) if pictures_of > 0 else frozenset()  # one listing: pictures drawn before
    with tempfile.TemporaryDirectory(prefix="iwae-report-") as tmp:
        md, files = _render(loaded, Path(tmp), results, data, pictures_of, have)
        for f in files:
            if f.exists():  # a picture already in the folder is not written again
                dest.write_bytes(f.name, f.read_bytes())
        return Report(md, loaded.summary, tuple(dest.uri(f.name) for f in files))


def _models_section(loaded: Loaded) -> list[str]:
    """The models scored with `score`, beside the trained runs on the same images, and their paired differences."""
    tm = models_table(loaded)
    if tm is None:
        return []
    parts = [
        "## Models scored with `iwae-pipeline score`",
        "",
        tm,
        "",
        "Each model under its importance-sampling estimate with the most images (L_5000 where it has it), on the images named by"
        " 'data' (mnist: the test set binarised by image id as Table 1's evaluation binarises it, so trained runs of this folder"
        " sit beside it). NLL by AIS: on the images AIS scored, with L_k on those same images beside it; 'AIS - L_k' is paired per"
        " image (positive: L_k understates log p(x)). The reliability columns are those of the k-sample pass (see 'How far each"
        " estimate can be trusted'); BDMC gap: upper minus lower bound on images simulated from the model. Failed images: where"
        " the model gave no finite log density; left out of every mean.",
        "",
    ]
    note = densities_note(loaded)
    if note:
        parts += [note, ""]
    tp = model_pairs_table(loaded)
    if tp:
        parts += ["Paired differences (positive favours b), on the images both scored:", "", tp, ""]
    return parts


def _render(
    loaded: Loaded, out_dir: Path, results: Results | None = None, data: Any = None, pictures_of: int = PICTURES, have: frozenset[str] = frozenset()
) -> tuple[str, list[Path]]:
    """Write report.md, the PNGs and summary.parquet into a local folder; returns the markdown and files."""
    if loaded.summary.empty:  # only models scored with `score`: their table alone
        md = "\n".join(["# iwae-pipeline report", "", *_models_section(loaded)]) + "\n"
        (out_dir / "report.md").write_text(md)
        return md, [out_dir / "report.md"]
    parts = [
        "# iwae-pipeline report",
        "",
        budget(loaded),
        "",
        *[f"**Note:** {n}." for n in loaded.notes],
        *([""] if loaded.notes else []),
        "## Table 1: VAE vs IWAE (test NLL in nats ± standard error; lower is better)",
        "",
    ]
    parts += [table1(loaded), ""]
    parts += [
        "Rows: one per cell (runs trained alike but for the objective and the seed) and seed; 'setup' says how a cell's training"
        " differs from the paper's. Estimate: the one both runs of a row are shown and compared on (L_5000 where both have it)."
        " NLL: minus the mean over test images of that estimate, ± its standard error. Active: units whose posterior mean"
        " varies (variance ≥ 0.01 over the first 500 training images, paper sec. 5.2); a+b counts layers 1 and 2.",
        "IWAE gain: mean over test images of log p_IWAE(x) - log p_VAE(x) with its paired standard error (positive favours IWAE).",
        "At k=1 the IWAE bound is the ELBO, so one model fills both columns (as in the paper).",
        "Paper columns: NLL (active units) after 3,280 epochs on all 60,000 training images, k=5000 on all 10,000 test images"
        " (Burda et al. 2016, Table 1). Compare only runs with the same budget.",
        "",
    ]
    ts = seed_table(loaded)
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
    tr = reliability_table(loaded)
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
    t2 = table2(loaded)
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
    te = estimator_table(loaded)
    if te:
        parts += ["## Estimators and bounds at matched cost", "", te, ""]
    tg = gap_table(loaded)
    if tg:
        parts += [
            "## Train-test gap (k=5000 on the first training images against the test set)",
            "",
            tg,
            "",
            "Different images, so the standard error is unpaired. Paper: 0.62-0.79 nats on MNIST after 3,280 epochs, on all of train.",
            "",
        ]
    ta = ais_table(loaded)
    if ta:
        parts += [
            "## How far is L_5000 from log p(x)? AIS and BDMC (iwae.ais)",
            "",
            ta,
            "",
            "On the same test images (binarised alike): AIS anneals from the encoder to the posterior over T temperatures with HMC"
            " (Wu et al. 2017; Cremer et al. 2018); its log-mean-exp over chains is a stochastic lower bound on log p(x) that tightens"
            " as T grows, so rows with more temperatures are the better estimate. 'AIS - L_k': how much L_k understates log p(x)"
            " (positive: AIS is higher); 'jackknife - L_k': what the jackknife predicted. BDMC gap: upper minus lower bound on images"
            " simulated from the model (Grosse et al. 2015), which bounds AIS's own error there.",
            "",
        ]
        tconv = ais_convergence_table(loaded)
        if tconv:
            parts += ["Convergence: each run's AIS as T doubles, on the images both settings scored:", "", tconv, ""]
        tgain = ais_gain_table(loaded, table1_cells(loaded))
        if tgain:
            parts += ["The IWAE gain measured each way (on the images both runs' AIS scored, the setting with the most images):", "", tgain, ""]
    parts += _models_section(loaded)
    parts += ["## Findings: the paper's claims at this budget", "", findings(loaded), ""]
    parts += [
        "Verdicts: a log-likelihood claim 'holds' when the gain, pooled over a cell's seeds on the images every run of the cell"
        " shares (each such image's gain averaged over the seeds), clears zero by two standard errors over images and, with two"
        " or more seeds, the per-seed gains on those images clear it by Student's t at 95% (seeds - 1 degrees of freedom);"
        " 'contradicted' likewise on the other side; one seed says so. Unit claims need every run (or pair) to agree;"
        " the pruning claim needs every run within 0.06 nats by two standard errors, the pruned model scored on the same draws"
        " as the model (common random numbers) where the estimate has them. Otherwise: not resolved at this budget."
        " Claim (1) 'by AIS' is the same test on the AIS estimates of the first test images, where every run of the cell has them.",
        "",
    ]
    parts += [
        "## All runs",
        "",
        all_runs_table(loaded),
        "",
        "Test NLL: minus the mean L_k over the images scored ('images'), ± standard error. Pruned NLL: the same with the inactive"
        " units removed (paper sec. 5.2: it should barely move). Active: units with posterior-mean variance ≥ 0.01."
        " Train s: wall seconds of training.",
        "",
    ]
    summary = loaded.summary
    failed = summary[summary.status != "done"]
    if len(failed):
        parts += [f"**{len(failed)} run(s) failed**: " + ", ".join(f"{r.run_id} ({r.label})" for r in failed.itertuples()), ""]
    files = plots(loaded, out_dir)
    parts += [f"![{p.stem}]({p.name})" for p in files]
    drawn = pictures(results, loaded, out_dir, data, pictures_of, have) if results is not None else []
    if drawn:
        parts += ["", "## What the models learned: samples, and test images beside their reconstructions", ""]
        parts += [f"**{label}**\n\n![{p.stem}]({p.name})\n" for label, p in drawn]
        files += [p for _, p in drawn]
    md = "\n".join(parts) + "\n"
    (out_dir / "report.md").write_text(md)
    flat = summary.drop(columns=[c for c in ("unit_var_h1", "unit_var_h2", "config") if c in summary])
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pandas(flat, preserve_index=False), out_dir / "summary.parquet")
    return md, [out_dir / "report.md", *files, out_dir / "summary.parquet"]
