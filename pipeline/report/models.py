"""The models table: every model scored with `iwae-pipeline score` (:mod:`pipeline.user_models`),
beside the project's trained runs that scored the same images, and the paired difference between
any two of them.

Each model is shown under its importance-sampling estimate with the most images (L_5000 where it
has it): NLL by L_k, by AIS on the images AIS scored (and L_k on those same images), the gap
AIS - L_k paired per image, and the reliability columns of the k-sample pass (median ESS, the share
of images whose Pareto k-hat is above 0.7, the mean Monte Carlo standard error, the jackknife's
predicted bias). Images on which a model gave no finite log density are counted, named by `score`,
and left out of every mean.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from iwae.diagnostics import KHAT_UNRELIABLE
from pipeline.report.stats import paired, se
from pipeline.report.summary import Loaded, estimate_label, headline
from pipeline.report.tables import fmt, markdown

# a trained run's test images, as `score --data mnist` scores them: MNIST's test set binarised by id
MNIST_TAG = "mnist"


def _ais_estimate(loaded: Loaded, run_id: str, table: str = "ais") -> str:
    """The run's AIS (or BDMC) estimate to show: the most temperatures, then the most images."""
    found = [(int(v.ais_steps.max()), len(v), e) for e in loaded.estimates_in(run_id, table) for v in [loaded.values(run_id, e, table)] if len(v)]
    return max(found)[2] if found else ""


def _members(loaded: Loaded) -> pd.DataFrame:
    """The models of the table: the scored ones, and the trained runs on MNIST where a scored model
    is on MNIST too (name, data tag, likelihood, whether scored)."""
    rows = [
        {"run_id": r.run_id, "name": r.label, "data": r.dataset, "likelihood": r.likelihood or "probability", "scored": True, "weights": _digest(r.config)}
        for r in loaded.models.itertuples()
    ]
    if any(r["data"] == MNIST_TAG for r in rows):
        done = loaded.summary[(loaded.summary.status == "done") & (loaded.summary.dataset == "mnist")]
        rows += [
            {"run_id": r.run_id, "name": f"{r.label} (trained here)", "data": MNIST_TAG, "likelihood": "probability", "scored": False, "weights": r.run_id}
            for r in done.itertuples()
        ]
    return pd.DataFrame(rows, columns=["run_id", "name", "data", "likelihood", "scored", "weights"])


def _digest(config: Any) -> str:
    """The first digits of a scored model's weights digest (from its row's config)."""
    try:
        return str(json.loads(config)["digest"])[:12]
    except (TypeError, ValueError, KeyError):
        return ""


def model_figures(loaded: Loaded, run_id: str) -> dict[str, Any]:
    """One model's figures (module docstring); NaN where it has nothing."""
    est = headline(loaded.estimates_of(run_id))  # the summary's rule, for models it does not hold too
    e = loaded.values(run_id, est) if est else pd.DataFrame(columns=["log_px", "log_px_jk", "ess", "khat", "mcse"])
    finite = e[np.isfinite(e.log_px.astype(float))] if len(e) else e
    lp = finite.log_px.astype(float)
    out: dict[str, Any] = {
        "estimate": est,
        "images": len(finite),
        "failed": len(e) - len(finite),
        "nll": -float(lp.mean()) if len(lp) else math.nan,
        "nll_se": se(lp),
        "jackknife": float((finite.log_px_jk - finite.log_px).mean()) if len(finite) else math.nan,
        "ess_median": float(finite.ess.median()) if len(finite) else math.nan,
        "khat_high": float((finite.khat > KHAT_UNRELIABLE).mean()) if len(finite) else math.nan,
        "mcse_mean": float(finite.mcse.mean()) if len(finite) else math.nan,
    }
    a_est = _ais_estimate(loaded, run_id)
    a_rows = loaded.values(run_id, a_est, "ais") if a_est else pd.DataFrame(columns=["log_px_ais", "eval_seed"])
    if len(e) and len(a_rows) and set(e.eval_seed.dropna()) != set(a_rows.eval_seed.dropna()):
        a_rows = a_rows.iloc[:0]  # binarised with another seed: other images, nothing to pair
    a = a_rows.log_px_ais.astype(float)
    a = a[np.isfinite(a)]
    both = a.index.intersection(lp.index)
    d = paired(lp.reindex(both), a.reindex(both))
    out.update(
        {
            "ais_estimate": a_est,
            "ais_images": len(both),
            "nll_lk_there": -float(lp.reindex(both).mean()) if len(both) else math.nan,
            "nll_ais": -float(a.reindex(both).mean()) if len(both) else math.nan,
            "nll_ais_se": se(a.reindex(both)),
            "gap": d.mean,
            "gap_se": d.se,
        }
    )
    b_est = _ais_estimate(loaded, run_id, "bdmc")  # one BDMC setting: the most temperatures, then the most images
    b = loaded.values(run_id, b_est, "bdmc") if b_est else loaded.bdmc.iloc[:0]
    bgap = (b.log_px_upper - b.log_px_ais).astype(float)
    bgap = bgap[np.isfinite(bgap)]
    out.update({"bdmc_gap": float(bgap.mean()) if len(bgap) else math.nan, "bdmc_gap_se": se(bgap), "bdmc_images": len(bgap)})
    return out


def models_table(loaded: Loaded) -> str | None:
    """Each scored model (and the trained runs on the same images) with its figures; None when no model was scored."""
    if not len(loaded.models):
        return None
    members = _members(loaded)
    rows = []
    for m in members.itertuples():
        f = model_figures(loaded, m.run_id)
        density = " (density)" if m.likelihood == "density" else ""
        rows.append(
            [
                m.name,
                m.weights,
                m.data,
                (estimate_label(f["estimate"]) if f["estimate"] else "-") + density,
                f["images"],
                fmt(f["nll"], f["nll_se"]),
                f"{f['ais_images']}" if f["ais_images"] else "-",
                fmt(f["nll_lk_there"]) if f["ais_images"] else "-",
                fmt(f["nll_ais"], f["nll_ais_se"]) if f["ais_images"] else "-",
                fmt(f["gap"], f["gap_se"]) if f["ais_images"] else "-",
                fmt(f["jackknife"]),
                fmt(f["ess_median"]),
                f"{f['khat_high']:.0%}" if not math.isnan(f["khat_high"]) else "-",
                fmt(f["mcse_mean"]),
                fmt(f["bdmc_gap"], f["bdmc_gap_se"]) if f["bdmc_images"] else "-",
                f["failed"] or "",
            ]
        )
    head = [
        "model", "id", "data", "estimate", "images", "NLL by L_k", "AIS images", "L_k there", "NLL by AIS", "AIS - L_k", "jackknife - L_k",
        "median ESS", "k-hat > 0.7", "MC s.e.", "BDMC gap", "failed images",
    ]  # fmt: skip
    return markdown(head, rows)


def model_pairs_table(loaded: Loaded) -> str | None:
    """log p_b(x) - log p_a(x) per image for any two models on the same data and estimate, paired on
    the images both scored (by L_k, and by AIS where both have it): every two scored models, and each
    scored model with each trained run (trained runs with each other are Table 1's)."""
    if not len(loaded.models):
        return None
    members = _members(loaded)
    rows = []
    for data, g in members.groupby("data", sort=True):
        scored = [r for r in g.itertuples() if r.scored]
        trained = [r for r in g.itertuples() if not r.scored]
        pairs = [(a, b) for i, a in enumerate(scored) for b in scored[i + 1 :]] + [(t, a) for a in scored for t in trained]
        for a, b in pairs:
            ea = loaded.common_estimate([a.run_id, b.run_id])
            if not ea:
                continue
            la, lb = _finite(loaded.values(a.run_id, ea).log_px), _finite(loaded.values(b.run_id, ea).log_px)
            d = paired(la, lb)
            aa, ab = _ais_estimate(loaded, a.run_id), _ais_estimate(loaded, b.run_id)
            da = (
                paired(_finite(loaded.values(a.run_id, aa, "ais").log_px_ais), _finite(loaded.values(b.run_id, aa, "ais").log_px_ais))
                if aa and aa == ab
                else None
            )
            rows.append(
                [
                    data,
                    f"{b.name} - {a.name}",
                    estimate_label(ea),
                    d.n,
                    fmt(d.mean, d.se),
                    f"{da.n}" if da and da.n else "-",
                    fmt(da.mean, da.se) if da and da.n else "-",
                ]
            )
    if not rows:
        return None
    return markdown(["data", "b - a", "estimate", "images", "log p_b - log p_a by L_k", "AIS images", "by AIS"], rows)


def _finite(s: pd.Series) -> pd.Series:
    s = s.astype(float)
    return s[np.isfinite(s)]


def densities_note(loaded: Loaded) -> str:
    """A line for the report when some scored model's likelihood is a density."""
    if not len(loaded.models) or not (loaded.models.likelihood == "density").any():
        return ""
    names = ", ".join(sorted(loaded.models[loaded.models.likelihood == "density"].label))
    return (
        f"(density): {names} model continuous data (a Gaussian decoder, say), so its log p(x) is a log density, in nats per"
        " image as given: comparable with other densities of the same data, not with a discrete model's log probability."
    )
