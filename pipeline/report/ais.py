"""How far is L_k from log p(x)? The AIS and BDMC tables (:mod:`iwae.ais`), from a loaded summary.

An AIS estimate is named by its settings (``T500-C16-L10-P100-seed0``, :mod:`pipeline.store.estimates`);
it is compared with a run's L_k estimate of the same images, binarised with the same seed.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from pipeline.report.stats import se, shared_images
from pipeline.report.summary import Loaded, estimate_label
from pipeline.report.tables import CellSeed, fmt, markdown, name


def steps_of(estimate: str) -> int:
    """T of an AIS estimate's name (``T500-...``)."""
    return int(estimate.split("-")[0][1:])


def _lk_estimate(loaded: Loaded, run_id: str, a: pd.DataFrame) -> str:
    """The run's L_k estimate to set beside AIS rows ``a``: its headline, if binarised with AIS's seed."""
    est = loaded.headline_of(run_id)
    e = loaded.values(run_id, est) if est else pd.DataFrame()
    if not len(e) or not len(a) or set(e.eval_seed.dropna()) != set(a.eval_seed.dropna()):
        return ""
    return est


def ais_vs_lk(loaded: Loaded, run_id: str, estimate: str) -> dict[str, Any]:
    """One run at one AIS estimate, on the test images that AIS and the run's L_k (binarised with the
    seed AIS used) both scored, paired per image: the NLL from L_k, its jackknife and AIS; ``gap`` =
    AIS - L_k (positive: L_k understates log p(x)) and what the jackknife predicted of it; BDMC's
    upper - lower gap on images simulated from the model. NaN where there is nothing."""
    a = loaded.values(run_id, estimate, "ais")
    lk_est = _lk_estimate(loaded, run_id, a)
    e = loaded.values(run_id, lk_est) if lk_est else pd.DataFrame(columns=["log_px", "log_px_jk", "eval_k"])
    both = a.index.intersection(e.index)
    lk, jk, la = e.log_px.reindex(both), e.log_px_jk.reindex(both), a.log_px_ais.reindex(both)
    d, j = (la - lk).dropna(), (jk - lk).dropna()
    b = loaded.values(run_id, estimate, "bdmc")
    bgap = b.log_px_upper - b.log_px_ais
    src = a if len(a) else b
    return {
        "estimate": estimate,
        "lk_estimate": lk_est,
        "images": len(both),
        "k": int(e.eval_k.iloc[0]) if len(e) else 0,
        "nll_lk": float(-lk.mean()) if len(both) else math.nan,
        "nll_jk": float(-jk.mean()) if len(both) else math.nan,
        "nll_ais": float(-la.mean()) if len(both) else math.nan,
        "gap": float(d.mean()) if len(d) else math.nan,
        "gap_se": se(d),
        "jackknife": float(j.mean()) if len(j) else math.nan,
        "bdmc_gap": float(bgap.mean()) if len(b) else math.nan,
        "bdmc_gap_se": se(bgap),
        "bdmc_images": len(b),
        "accept": float(src.accept.mean()) if len(src) else math.nan,
        "seconds_per_image": float(src.seconds.mean()) if len(src) else math.nan,
    }


def ais_table(loaded: Loaded) -> str | None:
    """Per run and AIS estimate (:func:`ais_vs_lk`): L_k, its jackknife, AIS, how far L_k is below AIS
    (paired) against what the jackknife predicted, and BDMC's gap on simulated data."""
    ais, bdmc = loaded.ais, loaded.bdmc
    if ais.empty and bdmc.empty:
        return None
    names = {str(r.run_id): name(r) for r in loaded.summary.itertuples()}
    keys = sorted({(str(r), str(e)) for df in (ais, bdmc) for r, e in df[["run_id", "estimate"]].drop_duplicates().itertuples(index=False)})
    keys = [k for k in keys if str(k[0]) in names]  # trained runs; models scored with `score` are in the models table
    if not keys:
        return None
    rows = []
    for rid, est in keys:
        r = ais_vs_lk(loaded, str(rid), str(est))
        some = loaded.values(str(rid), str(est), "ais")
        some = some if len(some) else loaded.values(str(rid), str(est), "bdmc")
        t, c, lf = (int(some[col].iloc[0]) for col in ("ais_steps", "ais_chains", "ais_leapfrog"))
        has = r["images"] > 0
        rows.append(
            [
                names.get(str(rid), str(rid)),
                f"{t} / {c} / {lf}",
                str(r["images"]),
                f"{fmt(r['nll_lk'])} ({estimate_label(r['lk_estimate'])})" if has else "-",
                fmt(r["nll_jk"]) if has else "-",
                fmt(r["nll_ais"]) if has else "-",
                fmt(r["gap"], r["gap_se"]) if has else "-",
                fmt(r["jackknife"]) if has else "-",
                f"{fmt(r['bdmc_gap'], r['bdmc_gap_se'])} ({r['bdmc_images']})" if r["bdmc_images"] else "-",
                f"{r['accept']:.2f}",
                f"{r['seconds_per_image']:.2f}",
            ]
        )
    head = ["run", "T / chains / leapfrog", "images", "NLL from L_k", "NLL from the jackknife", "NLL from AIS", "AIS - L_k (paired)", "jackknife - L_k"]
    return markdown([*head, "BDMC gap (simulated images)", "acceptance", "s per image"], rows)


def ais_convergence_table(loaded: Loaded) -> str | None:
    """Per run, AIS at each T against the next larger T with the same other settings, on the images
    both scored, paired: an estimate that has converged stops moving as T grows."""
    ais = loaded.ais
    if ais.empty:
        return None
    names = {str(r.run_id): name(r) for r in loaded.summary.itertuples()}
    rows = []
    groups = ais.assign(rest=ais.estimate.astype(str).str.split("-", n=1).str[1]).groupby(["run_id", "rest"], sort=True, observed=True)
    for (rid, _), g in groups:
        if str(rid) not in names:  # a model scored with `score`: the models table
            continue
        ests = sorted(set(g.estimate), key=steps_of)
        for small, large in zip(ests, ests[1:]):
            a, b = loaded.values(str(rid), small, "ais").log_px_ais, loaded.values(str(rid), large, "ais").log_px_ais
            both = a.index.intersection(b.index)
            if len(both) < 2:
                continue
            d = b.reindex(both) - a.reindex(both)
            cells = [names.get(str(rid), str(rid)), f"{steps_of(small)} → {steps_of(large)}", str(len(both))]
            rows.append([*cells, fmt(-float(a.reindex(both).mean())), fmt(-float(b.reindex(both).mean())), fmt(float(d.mean()), se(d))])
    if not rows:
        return None
    return markdown(["run", "T", "images", "NLL from AIS at the smaller T", "at the larger T", "log p̂ change (paired)"], rows)


def shared_ais(loaded: Loaded, run_ids: list[str]) -> tuple[str, pd.Index] | None:
    """The AIS estimate every run of ``run_ids`` has, with the most images they all share, then the
    largest T; and those images. None when they share none (or fewer than two images)."""
    if not run_ids:
        return None
    per = [loaded.estimates_in(r, "ais") for r in run_ids]
    common = set.intersection(*per)
    best: tuple[str, pd.Index] | None = None
    for est in sorted(common, key=steps_of):
        ids = shared_images([loaded.values(r, est, "ais").log_px_ais for r in run_ids])
        if best is None or (len(ids), steps_of(est)) >= (len(best[1]), steps_of(best[0])):
            best = (est, ids)
    return best if best is not None and len(best[1]) >= 2 else None


def ais_gain_table(loaded: Loaded, cells: list[CellSeed]) -> str | None:
    """The IWAE gain over the VAE measured each way, per pair, on the images both runs' AIS scored with
    one estimate (the most images, then the largest T), paired per image."""
    rows = []
    for c in cells:
        if not c.complete:
            continue
        found = shared_ais(loaded, [c.vae.run_id, c.iwae.run_id])
        if found is None:
            continue
        est, ids = found
        d_ais = (loaded.values(c.iwae.run_id, est, "ais").log_px_ais - loaded.values(c.vae.run_id, est, "ais").log_px_ais).reindex(ids)
        d_is = (loaded.log_px(c.iwae.run_id, c.estimate).reindex(ids) - loaded.log_px(c.vae.run_id, c.estimate).reindex(ids)).dropna()
        f = c.first
        rows.append(
            [f.dataset, f.layers, f.k, f.epochs, f.setting or "paper", c.seed, f"T={steps_of(est)}", len(ids)]
            + [f"{fmt(float(d_is.mean()), se(d_is))} ({estimate_label(c.estimate)})", fmt(float(d_ais.mean()), se(d_ais))]
        )
    if not rows:
        return None
    return markdown(["data", "layers", "k", "epochs", "setup", "seed", "AIS", "images", "IWAE gain by L_k", "IWAE gain by AIS"], rows)
