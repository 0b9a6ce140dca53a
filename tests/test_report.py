"""Report tables and plot labels on small hand-made frames: two seeds of one cell, or a run and its
continuation, never read alike, and every estimator is compared with the standard IWAE of its own seed."""

import numpy as np
import pandas as pd

from pipeline.report import all_runs_table, estimator_table, reliability_table, run_labels


def _frames():
    # run -> (objective, estimator, seed, log p(x) of images 0..3)
    runs = {
        "iw0": ("iwae", "standard", 0, [-100.0, -101.0, -99.0, -100.0]),
        "iw1": ("iwae", "standard", 1, [-90.0, -91.0, -89.0, -90.0]),  # a seed 10 nats better than seed 0
        "dr0": ("iwae", "dreg", 0, [-99.0, -100.0, -98.0, -99.0]),  # 1 nat better than iw0 on every image
    }
    ev = pd.DataFrame([{"run_id": r, "image_id": i, "eval_k": 5000, "log_px": lp} for r, (_, _, _, lps) in runs.items() for i, lp in enumerate(lps)])
    summary = pd.DataFrame(
        [
            {
                "run_id": r,
                "label": f"mnist L1 IWAE(k=50){' ' + est.upper() if est != 'standard' else ''}",
                "objective": obj,
                "estimator": est,
                "seed": seed,
                "status": "done",
                "init_from": "",
                "dataset": "mnist",
                "layers": 1,
                "epochs": 4,
                "k": 50,
                "m": 1,
                "nll": -float(np.mean(lps)),
                "nll_se": 0.5,
                "nll_jk": -float(np.mean(lps)) - 0.2,
                "active": "50",
                "eval_k": 5000,
                "test_images": len(lps),
                "ess_median": 5.0,
                "khat_high": 1.0,
                "mcse_mean": 0.4,
            }
            for r, (obj, est, seed, lps) in runs.items()
        ]
    )
    return summary.sort_values("seed", ascending=False).reset_index(drop=True), ev  # seed 1 first: order must not matter


def test_each_estimator_is_compared_with_the_standard_iwae_of_its_own_seed():
    summary, ev = _frames()
    table = estimator_table(summary, ev)
    assert table is not None
    rows = table.splitlines()[2:]
    ref = rows.index(next(r for r in rows if "(reference)" in r and " s1 " not in r))
    dreg = next(r for r in rows if "DREG" in r)
    assert dreg.endswith("| 1.00 ± 0.00 |"), table  # against seed 0 (+1), not seed 1 (-9)
    assert rows.index(dreg) == ref + 1, table


def test_two_seeds_of_one_run_read_differently_in_the_reliability_table():
    summary, _ = _frames()
    table = reliability_table(summary)
    assert table is not None
    names = [r.split("|")[1].strip() for r in table.splitlines()[2:]]
    assert len(set(names)) == len(names) == 3 and "mnist L1 IWAE(k=50) s1" in names, names


def test_a_run_and_its_continuation_read_differently_in_the_plots():
    summary, _ = _frames()
    cont = summary.iloc[[0]].assign(run_id="iw0c", seed=0, init_from="iw0")  # same label, continued from iw0
    labels = run_labels(pd.concat([summary, cont], ignore_index=True))
    assert len(set(labels.values())) == len(labels) == 4, labels
    assert labels["iw0c"] == "mnist L1 IWAE(k=50) from iw0" and labels["iw1"] == "mnist L1 IWAE(k=50) s1", labels


def test_two_seeds_of_one_run_read_differently_in_the_table_of_all_runs():
    summary, _ = _frames()
    summary = summary.assign(error="", nll_pruned=np.nan, train_seconds=60.0)
    names = [r.split("|")[2].strip() for r in all_runs_table(summary).splitlines()[2:]]
    assert len(set(names)) == len(names) == 3 and "mnist L1 IWAE(k=50) s1" in names, names


def _pair_frames(gain: float, pruned_shift: float = 0.0, h2: int | None = None):
    """A VAE and an IWAE (k=5, seeds 0 and 1) on 50 images: the IWAE better by ``gain`` nats plus noise."""
    rng = np.random.default_rng(0)
    base = rng.normal(-100, 5, 50)
    rows, ev = [], []
    for seed in (0, 1):
        for obj, shift, units in (("vae", 0.0, 20), ("iwae", gain, 25)):
            rid = f"{obj}{seed}"
            lp = base + shift + rng.normal(0, 0.1, 50)
            ev += [
                {"run_id": rid, "image_id": i, "eval_k": 5000, "log_px": v, "log_px_pruned": v + pruned_shift, "log_px_jk": v + 0.1} for i, v in enumerate(lp)
            ]  # noqa: E501
            rows.append(
                {"run_id": rid, "label": obj, "objective": obj, "estimator": "standard", "seed": seed, "status": "done", "init_from": "", "dataset": "mnist"}
                | {"layers": 2 if h2 is not None else 1, "epochs": 4, "k": 5, "m": 1, "active_h1": units, "active_h2": h2, "nll": -lp.mean()}
            )
    return pd.DataFrame(rows), pd.DataFrame(ev)


def _verdicts(summary, ev):
    from pipeline.report import findings

    out: dict[str, str] = {}
    for line in findings(summary, ev).splitlines()[2:]:  # the first row of each claim: (1) at k=5
        out.setdefault(line.split("|")[1].strip()[:3], line.split("|")[3].strip())
    return out


def test_findings_follow_the_data():
    """Each claim's verdict comes from the figures: a clear IWAE gain holds, a clear loss contradicts,
    pruning that moves the NLL by 0.1 nats contradicts claim (4), and layer 2's units decide claim (5)."""
    good = _verdicts(*_pair_frames(gain=1.0, h2=4))
    assert good["(1)"] == "holds" and good["(2)"] == "holds" and good["(4)"] == "holds" and good["(5)"] == "holds", good
    bad = _verdicts(*_pair_frames(gain=-1.0, pruned_shift=0.1, h2=12))
    assert bad["(1)"] == "contradicted" and bad["(4)"] == "contradicted" and bad["(5)"] == "contradicted", bad
    none = _verdicts(*_pair_frames(gain=0.0))
    assert none["(1)"] == "not resolved at this budget" and "no two-layer run" in findings_text(*_pair_frames(gain=0.0)), none


def findings_text(summary, ev):
    from pipeline.report import findings

    return findings(summary, ev)


def test_ais_table_reports_how_far_l5000_is_below_ais():
    """AIS 0.3 nats above L_5000 on every image: the table says 0.30, beside the jackknife's 0.10."""
    from pipeline.report import ais_table

    summary, ev = _pair_frames(gain=1.0)
    ev = ev.assign(eval_seed=123)
    ais = ev.assign(log_px_ais=ev.log_px + 0.3, ais_steps=500, ais_chains=16, ais_leapfrog=10, ais_seed=0, accept=0.7, seconds=1.0)
    bdmc = ais.assign(log_px_upper=ais.log_px_ais + 0.05)
    row = next(r for r in ais_table(summary, ev, ais, bdmc).splitlines()[2:] if r.startswith("| vae "))
    cells = [c.strip() for c in row.split("|")]
    assert cells[7].startswith("0.30 ± 0.00") and cells[8] == "0.10" and cells[9].startswith("0.05"), cells


def _ais_frame(ev: pd.DataFrame, shift: dict[str, float], steps: int = 500) -> pd.DataFrame:
    """AIS rows on the first 30 of ``ev``'s images: each run's L_k plus its ``shift`` (nats)."""
    a = ev[ev.image_id < 30]
    return a.assign(log_px_ais=a.log_px + a.run_id.map(shift), ais_steps=steps, ais_chains=16, ais_leapfrog=10, ais_seed=0, accept=0.7, seconds=1.0)


def test_claim_one_is_also_judged_by_ais_where_every_run_has_it():
    """L_k says the IWAE loses by 0.5 nats; AIS, which lifts the IWAE 2 nats and the VAE 0.5, says it
    wins by 1: claim (1) gets both rows with opposite verdicts. Without AIS there is no AIS row."""
    from pipeline.report import findings

    summary, ev = _pair_frames(gain=-0.5)
    ais = _ais_frame(ev, {"vae0": 0.5, "vae1": 0.5, "iwae0": 2.0, "iwae1": 2.0})
    rows = {r.split("|")[1].strip(): r.split("|")[3].strip() for r in findings(summary, ev, ais).splitlines()[2:]}
    cell = "(1) IWAE beats the VAE in test log-likelihood at k=5 (mnist, 1 layer(s), 4 epochs)"
    assert rows[cell] == "contradicted" and rows[cell + ", by AIS (T=500, 30 images)"] == "holds", rows
    assert not any("by AIS" in r for r in findings(summary, ev).splitlines())
    partial = ais[ais.run_id != "iwae1"]  # a run of the cell without AIS: no AIS verdict for the cell
    assert not any("by AIS" in r for r in findings(summary, ev, partial).splitlines())
    # seed 0 also has AIS on images 30-49, where its IWAE is 10 nats better: those images are not shared, so they do not count
    more = ev[(ev.image_id >= 30) & ev.run_id.isin(["vae0", "iwae0"])]
    more = more.assign(log_px_ais=more.log_px + more.run_id.map({"vae0": 0.5, "iwae0": 12.0}), ais_steps=500, ais_chains=16)
    more = more.assign(ais_leapfrog=10, ais_seed=0, accept=0.7, seconds=1.0)
    rows = {r.split("|")[1].strip(): r.split("|")[2].strip() for r in findings(summary, ev, pd.concat([ais, more])).splitlines()[2:]}
    assert 0.8 < float(rows[cell + ", by AIS (T=500, 30 images)"].split()[0]) < 1.2, rows


def test_ais_convergence_table_pairs_each_t_with_the_next():
    """AIS at T=250 and T=500 on the same images, 0.2 nats apart for one run: the change reads 0.20 there
    and 0.00 for the other; T=1000 on too few shared images (one) gets no row."""
    from pipeline.report import ais_convergence_table

    summary, ev = _pair_frames(gain=1.0)
    flat = {r: 0.0 for r in ("vae0", "vae1", "iwae0", "iwae1")}
    ais = pd.concat([_ais_frame(ev, flat, 250), _ais_frame(ev, flat | {"vae0": 0.2})])
    ais = pd.concat([ais, _ais_frame(ev[ev.image_id == 0], {"vae0": 0.0}, 1000)])
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:7]] for r in ais_convergence_table(summary, ais).splitlines()[2:] if "vae" in r}
    assert rows["vae"] == ["250 → 500", "30", rows["vae"][2], rows["vae"][3], "0.20 ± 0.00"], rows
    assert len([r for r in ais_convergence_table(summary, ais).splitlines()[2:]]) == 4


def test_one_seed_is_named_and_seeds_that_disagree_leave_the_claim_open():
    """Claim (1) with one seed says so; with two seeds whose gains have opposite signs it is not resolved,
    however small each seed's paired standard error."""
    summary, ev = _pair_frames(gain=1.0)
    one = _verdicts(summary[summary.seed == 0], ev[ev.run_id.isin(["vae0", "iwae0"])])
    assert one["(1)"] == "holds (one seed only)", one
    ev = ev.assign(log_px=np.where(ev.run_id == "iwae1", ev.log_px - 2.0, ev.log_px))  # seed 1: IWAE 1 nat worse
    assert _verdicts(summary, ev)["(1)"] == "not resolved at this budget"


def test_a_claim_that_log_p_goes_down_keeps_the_one_seed_qualifier():
    """Claim (3)'s IWAE -> VAE row reads _gain's verdict the other way round: the qualifier survives the flip."""
    from pipeline.report import NR, _flip

    assert _flip("contradicted (one seed only)") == "holds (one seed only)"
    assert _flip("holds") == "contradicted" and _flip(NR) == NR
