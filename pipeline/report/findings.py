"""The paper's five claims, each with our figure, its error and spread, and a verdict from the data.

Gains are pooled over seeds on the images every pooled run shares (:func:`pipeline.report.stats.pooled`),
and each verdict's text says what was pooled. Claim (1) is also judged on the AIS estimates where
every run of a cell has them: L_k understates log p(x) by more for the IWAE than for the VAE, so
the two verdicts can differ.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipeline.report.ais import shared_ais, steps_of
from pipeline.report.stats import Pooled, pooled, se
from pipeline.report.summary import Loaded, estimate_label
from pipeline.report.tables import CellSeed, fmt, markdown, name, table1_cells

NR = "not resolved at this budget"


def _signs(values: list[int], sign: int = 1) -> str:
    """'holds' when every value has the sign, 'contradicted' when every one has the other."""
    return "holds" if all(sign * v > 0 for v in values) else "contradicted" if all(sign * v < 0 for v in values) else NR


def _verdict(mean: float, err: float, threshold: float = 0.0) -> str:
    """'holds' when mean - 2 se > threshold, 'contradicted' when mean + 2 se < threshold."""
    if np.isnan(mean) or np.isnan(err):
        return NR
    if mean - 2 * err > threshold:
        return "holds"
    if mean + 2 * err < threshold:
        return "contradicted"
    return NR


def flip(verdict: str) -> str:
    """A verdict on "goes up" read as one on "goes down": holds and contradicted swap, and a qualifier
    such as "(one seed only)" stays."""
    head, sep, tail = verdict.partition(" (")
    return {"holds": "contradicted", "contradicted": "holds"}.get(head, head) + sep + tail


def judge(p: Pooled) -> tuple[str, str]:
    """A pooled gain as (figure, verdict): it must clear zero by two standard errors over images and,
    with two or more seeds, the per-seed gains must clear it by Student's t at 95%; one seed says so."""
    if p.images < 2:
        return "no image every run shares", NR
    what = f"{p.seeds} seed{'s' if p.seeds > 1 else ''} on the {p.images:,} images every run shares"
    fig = f"{fmt(p.mean, p.se)} nats ({what}"
    verdict = _verdict(p.mean, p.se)
    if p.seeds == 1:
        return fig + ")", verdict if verdict == NR else f"{verdict} (one seed only)"
    fig += f"; per seed {', '.join(f'{x:+.2f}' for x in p.per_seed)}, 95% t-interval ± {p.half_width:.2f})"
    if verdict == "holds" and p.mean - p.half_width <= 0 or verdict == "contradicted" and p.mean + p.half_width >= 0:
        verdict = NR
    return fig, verdict


def _active(r: Any) -> int:
    return int(r.active_h1) + (int(r.active_h2) if not pd.isna(r.active_h2) else 0)


def findings(loaded: Loaded) -> str:
    """The findings table (module docstring)."""
    cells = table1_cells(loaded)
    pairs = [c for c in cells if c.complete]
    rows: list[list[str]] = []
    # (1) IWAE reaches a better test log-likelihood than the VAE at k = 5 and 50: per cell, pooled over seeds
    for k in (5, 50):
        by_cell: dict[str, list[CellSeed]] = {}
        for c in pairs:
            if int(c.first.k) == k:
                by_cell.setdefault(c.cell, []).append(c)
        if not by_cell:
            rows.append([f"(1) IWAE beats the VAE in test log-likelihood at k={k}", "no pair", NR])
        for cs in by_cell.values():
            f = cs[0].first
            claim = f"(1) IWAE beats the VAE in test log-likelihood at k={k} ({f.dataset}, {f.layers} layer(s), {f.epochs} epochs"
            claim += f", {f.setting})" if f.setting else ")"
            ids = [r for c in cs for r in (c.vae.run_id, c.iwae.run_id)]
            est = loaded.common_estimate(ids)
            if not est:
                rows.append([claim, "no estimate every run has", NR])
                continue
            fig, verdict = judge(pooled([(loaded.log_px(c.vae.run_id, est), loaded.log_px(c.iwae.run_id, est)) for c in cs]))
            rows.append([f"{claim}, by {estimate_label(est)}", fig, verdict])
            found = shared_ais(loaded, ids)
            if found is not None:
                a_est, images = found
                ais = {r: loaded.values(r, a_est, "ais").log_px_ais.reindex(images) for r in ids}
                fig, verdict = judge(pooled([(ais[c.vae.run_id], ais[c.iwae.run_id]) for c in cs]))
                rows.append([f"{claim}, by AIS (T={steps_of(a_est)}, {len(images)} images)", fig, verdict])
    # (2) IWAE uses more active units
    diffs = [_active(c.iwae) - _active(c.vae) for c in pairs if int(c.first.k) > 1]
    fig = f"{np.mean(diffs):+.1f} units over {len(diffs)} pair(s) (range {min(diffs):+d} to {max(diffs):+d})" if diffs else "no pair"
    rows.append(["(2) IWAE has more active units (k > 1)", fig, _signs(diffs) if diffs else NR])
    rows += _swaps(loaded)
    rows.append(_pruning(loaded))
    # (5) in the two-layer models the second layer keeps fewer than 10 active units
    s = loaded.summary
    h2 = [int(x) for x in s[(s.status == "done") & (s.layers == 2) & s.active_h2.notna()].active_h2]
    fig = f"{', '.join(map(str, h2))} over {len(h2)} run(s)" if h2 else "no two-layer run"
    rows.append(["(5) two-layer models: fewer than 10 active units in layer 2", fig, _signs([10 - h for h in h2]) if h2 else NR])
    return markdown(["claim (Burda et al. 2016)", "our figure", "verdict"], rows)


def _swaps(loaded: Loaded) -> list[list[str]]:
    """(3) a VAE trained further with the IWAE objective gains log p and active units; the reverse
    loses both: each swapped run against its control (the same model continued with its own
    objective for as long, same family and seed), pooled over seeds."""
    s = loaded.summary
    done = s[s.status == "done"].set_index("run_id", drop=False)
    cont = done[done.init_from != ""]
    out = []
    for src, dst, want in (("vae", "iwae", 1), ("iwae", "vae", -1)):
        claim = f"(3) {src.upper()} continued as {dst.upper()}: log p and active units go {'up' if want > 0 else 'down'} (against its control)"
        swaps, du = [], []
        for _, r in cont[cont.objective == dst].iterrows():
            if r.init_from not in done.index or done.loc[r.init_from].objective != src:
                continue
            first = done.loc[r.init_from]
            ctrl = cont[(cont.family == r.family) & (cont.seed == r.seed) & (cont.objective == src) & (cont.k == first.k)]
            if len(ctrl) == 1:
                c = ctrl.iloc[0]
                est = loaded.common_estimate([c.run_id, r.run_id])
                swaps.append((loaded.log_px(c.run_id, est), loaded.log_px(r.run_id, est)))
                du.append(_active(r) - _active(c))
        if not swaps:
            out.append([claim, "no swapped run with its control", NR])
            continue
        fig, v_nll = judge(pooled(swaps))
        v_nll = v_nll if want > 0 else flip(v_nll)
        v_units = _signs(du, want)
        verdict = "holds" if v_nll.startswith("holds") and v_units == "holds" else "contradicted" if "contradicted" in (v_nll[:12], v_units) else NR
        out.append([claim, f"log p {fig}; units {', '.join(f'{d:+d}' for d in du)}", f"{verdict} (log p: {v_nll}; units: {v_units})"])
    return out


def _pruning(loaded: Loaded) -> list[str]:
    """(4) removing the inactive units changes the NLL by less than 0.06 nats, in every run: the pruned
    model against the model per image, on the same draws where the estimate has them."""
    moves = []
    for r in loaded.summary[loaded.summary.status == "done"].itertuples():
        if not r.estimate:
            continue
        how, pr = loaded.pruned_of(str(r.run_id), str(r.estimate))
        d = (pr - loaded.log_px(str(r.run_id), str(r.estimate))).dropna()
        if len(d) > 1:
            moves.append((abs(float(d.mean())), se(d), name(r), how))
    claim = "(4) pruning inactive units moves the NLL by < 0.06 nats"
    if not moves:
        return [claim, "no pruned evaluation", NR]
    worst = max(moves)
    hows = " and ".join(sorted({h for *_, h in moves}))
    fig = f"largest: {worst[0]:.3f} ± {worst[1]:.3f} ({worst[2]}) over {len(moves)} run(s), paired per image on the {hows}"
    verdict = "holds" if all(m + 2 * e < 0.06 for m, e, _, _ in moves) else "contradicted" if any(m - 2 * e > 0.06 for m, e, _, _ in moves) else NR
    return [claim, fig, verdict]
