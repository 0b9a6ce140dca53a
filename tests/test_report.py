"""Report tables, findings and plot labels on results written by hand (tests/fakes.py) and read back
through the one reader: runs are paired only within a cell and on an estimate both have, two seeds
or a run and its continuation never read alike, and the statistics are the ones the text states."""

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.report import load
from pipeline.report.findings import NR, findings, flip
from pipeline.report.stats import pooled, t975
from pipeline.report.tables import all_runs_table, estimator_table, reliability_table, run_labels, table1
from pipeline.store.results import Results
from tests.fakes import AIS, L5000, add_estimate, add_run, run, seq


@pytest.fixture
def res(tmp_path):
    return Results.open(str(tmp_path / "res"))


def _rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()[2:]]


def test_each_estimator_is_compared_with_the_standard_iwae_of_its_own_seed(res):
    """DReG (seed 0) is 1 nat better than the standard IWAE of seed 0 on every image and 9 worse than
    seed 1's: its gain reads +1.00, against its own seed's reference, listed right after it."""
    for cfg, base in ((run("iwae", 50, 0), -100.0), (run("iwae", 50, 1), -90.0), (run("iwae", 50, 0, estimator="dreg"), -99.0)):
        add_run(res, cfg, active=50)
        add_estimate(res, cfg.run_id, seq([base, base - 1, base + 1, base]))
    rows = _rows(estimator_table(load(res)))
    dreg = next(r for r in rows if "/dreg" in r[0])
    ref = next(i for i, r in enumerate(rows) if r[-1] == "(reference)" and " s1" not in r[0])
    assert dreg[-1] == "1.00 ± 0.00" and rows.index(dreg) == ref + 1, rows


def test_two_seeds_of_one_run_read_differently_in_the_reliability_and_all_runs_tables(res):
    """Two seeds of one config and a third run: three distinct names in both tables."""
    for cfg in (run("iwae", 50, 0), run("iwae", 50, 1), run("vae", 50, 0)):
        add_run(res, cfg)
        add_estimate(res, cfg.run_id, seq([-100.0, -101.0]), log_px_jk=-99.0, ess=5.0, khat=0.5, mcse=0.1)
    loaded = load(res)
    for table, col in ((reliability_table(loaded), 0), (all_runs_table(loaded), 1)):
        names = [r[col] for r in _rows(table)]
        assert len(set(names)) == len(names) == 3 and "mnist L1 IWAE(k=50) s1" in names, names


def test_a_run_and_its_continuation_read_differently_in_the_plots(res):
    first = run("iwae", 50, 0)
    cont = run("iwae", 50, 0, init_from=first.run_id)
    for cfg in (first, cont):
        add_run(res, cfg)
    labels = run_labels(load(res).summary)
    assert labels[cont.run_id] == f"mnist L1 IWAE(k=50) from {first.run_id}" and labels[first.run_id] == "mnist L1 IWAE(k=50)", labels


def _pair(res, gain: float, seeds=(0, 1), n: int = 50, pruned_shift: float | None = None, h2: int | None = None, k: int = 5, **kw) -> None:
    """A VAE and an IWAE per seed on ``n`` images: the IWAE better by ``gain`` nats plus noise; with
    ``pruned_shift`` also each run's pruned estimate, that much above it."""
    rng = np.random.default_rng(0)
    base = rng.normal(-100, 5, n)
    for seed in seeds:
        for obj, shift, units in (("vae", 0.0, 20), ("iwae", gain, 25)):
            cfg = run(obj, k, seed, layers=2 if h2 is not None else 1, **kw)
            add_run(res, cfg, active=units, active_h2=h2)
            lp = base + shift + rng.normal(0, 0.1, n)
            add_estimate(res, cfg.run_id, seq(lp), log_px_jk=dict(enumerate(lp + 0.1)))
            if pruned_shift is not None:
                add_estimate(res, cfg.run_id, seq(lp + pruned_shift), L5000 + "-pruned")


def _verdicts(res) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in _rows(findings(load(res))):
        out.setdefault(r[0][:3], r[2])  # the first row of each claim: (1) at k=5
    return out


def test_findings_follow_the_data(tmp_path):
    """Each claim's verdict comes from the figures: a clear IWAE gain holds, a clear loss contradicts,
    pruning that moves the NLL by 0.1 nats contradicts claim (4), and layer 2's units decide claim (5)."""
    good = Results.open(str(tmp_path / "good"))
    _pair(good, 1.0, pruned_shift=0.0, h2=4)
    v = _verdicts(good)
    assert v["(1)"] == v["(2)"] == v["(4)"] == v["(5)"] == "holds", v
    bad = Results.open(str(tmp_path / "bad"))
    _pair(bad, -1.0, pruned_shift=0.1, h2=12)
    v = _verdicts(bad)
    assert v["(1)"] == v["(4)"] == v["(5)"] == "contradicted", v
    none = Results.open(str(tmp_path / "none"))
    _pair(none, 0.0)
    assert _verdicts(none)["(1)"] == NR and "no two-layer run" in findings(load(none))


def test_the_pruned_estimate_is_paired_with_its_model_and_says_which_draws(res):
    """Claim (4) reads the pruned estimate (same draws) beside the model's; a results location of an
    earlier layout, whose rows carry the pruned model's own-draw estimate in a column, is read as
    that estimate and named so."""
    _pair(res, 1.0, seeds=(0,), pruned_shift=0.01)
    row = next(r for r in _rows(findings(load(res))) if r[0].startswith("(4)"))
    assert row[1].startswith("largest: 0.010") and "same draws" in row[1] and row[2] == "holds", row
    old = run("vae", 50, 3)
    add_run(res, old)
    add_estimate(res, old.run_id, seq([-100.0, -101.0, -102.0]), name="shard-00000-of-00001.parquet", log_px_pruned=dict(enumerate([-100.2, -101.2, -102.2])))
    loaded = load(res)
    assert loaded.summary.set_index("run_id").loc[old.run_id, "nll_pruned"] == pytest.approx(101.2)
    row = next(r for r in _rows(findings(loaded)) if r[0].startswith("(4)"))
    assert "own draws and same draws" in row[1] and row[1].startswith("largest: 0.200"), row


def test_ais_table_reports_how_far_l5000_is_below_ais(res):
    """AIS 0.3 nats above L_5000 on every image: the table says 0.30, beside the jackknife's 0.10, and
    BDMC's gap of 0.05."""
    _pair(res, 1.0, seeds=(0,))
    from pipeline.report.ais import ais_table

    loaded = load(res)
    for rid in loaded.summary.run_id:
        lp = loaded.log_px(rid)
        add_estimate(res, rid, dict(lp + 0.3), AIS, "ais")
        add_estimate(res, rid, dict(lp + 0.3), AIS, "bdmc", log_px_upper=dict(lp + 0.35))
    row = next(r for r in _rows(ais_table(load(res))) if r[0] == "mnist L1 VAE(k=5)")
    assert row[6].startswith("0.30 ± 0.00") and row[7] == "0.10" and row[8].startswith("0.05"), row


def test_claim_one_is_also_judged_by_ais_where_every_run_has_it(tmp_path):
    """L_k says the IWAE loses by 0.5 nats; AIS, which lifts the IWAE 2 nats and the VAE 0.5, says it
    wins by 1: claim (1) gets both rows with opposite verdicts. A cell where one run lacks AIS gets
    no AIS row, and AIS images that one seed alone has do not count."""
    res = Results.open(str(tmp_path / "a"))
    _pair(res, -0.5)
    loaded = load(res)
    lift = {r.run_id: (0.5 if r.objective == "vae" else 2.0) for r in loaded.summary.itertuples()}
    for rid, d in lift.items():
        lp = loaded.log_px(rid)
        add_estimate(res, rid, dict(lp[lp.index < 30] + d), AIS, "ais")
    rows = {r[0]: r[2] for r in _rows(findings(load(res)))}
    cell = "(1) IWAE beats the VAE in test log-likelihood at k=5 (mnist, 1 layer(s), 3280 epochs"
    lk = next(c for c in rows if c.startswith(cell) and "by L_5000" in c)
    by_ais = next(c for c in rows if c.startswith(cell) and "by AIS (T=500, 30 images)" in c)
    assert rows[lk] == "contradicted" and rows[by_ais] == "holds", rows
    # seed 0 also has AIS on images 30-49, where its IWAE is 10 nats better: not shared, so not counted
    s0 = loaded.summary[loaded.summary.seed == 0]
    for r in s0.itertuples():
        lp = loaded.log_px(r.run_id)
        add_estimate(res, r.run_id, dict(lp[lp.index >= 30] + (0.5 if r.objective == "vae" else 12.0)), AIS, "ais")
    fig = next(r[1] for r in _rows(findings(load(res))) if "by AIS (T=500, 30 images)" in r[0])
    assert 0.8 < float(fig.split()[0]) < 1.2, fig


def test_ais_convergence_table_pairs_each_t_with_the_next(res):
    """AIS at T=250 and T=500 on the same images, 0.2 nats apart for one run: the change reads 0.20
    there and 0.00 for the other; T=1000 on one shared image gets no row."""
    from pipeline.report.ais import ais_convergence_table

    _pair(res, 1.0, seeds=(0,))
    loaded = load(res)
    vae = loaded.summary[loaded.summary.objective == "vae"].run_id.iloc[0]
    for rid in loaded.summary.run_id:
        lp = loaded.log_px(rid).iloc[:30]
        add_estimate(res, rid, dict(lp), "T250-C16-L10-P100-seed0", "ais")
        add_estimate(res, rid, dict(lp + (0.2 if rid == vae else 0.0)), AIS, "ais")
        add_estimate(res, rid, dict(lp.iloc[:1]), "T1000-C16-L10-P100-seed0", "ais")
    rows = _rows(ais_convergence_table(load(res)))
    assert len(rows) == 2 and all(r[1] == "250 → 500" and r[2] == "30" for r in rows), rows
    assert sorted(r[5] for r in rows) == ["0.00 ± 0.00", "0.20 ± 0.00"], rows


def test_one_seed_is_named_and_seeds_that_disagree_leave_the_claim_open(tmp_path):
    """Claim (1) with one seed says so; with two seeds whose gains have opposite signs it is not
    resolved, however small each seed's paired standard error."""
    one = Results.open(str(tmp_path / "one"))
    _pair(one, 1.0, seeds=(0,))
    assert _verdicts(one)["(1)"] == "holds (one seed only)"
    two = Results.open(str(tmp_path / "two"))
    _pair(two, 1.0)
    loaded = load(two)
    iwae1 = loaded.summary[(loaded.summary.objective == "iwae") & (loaded.summary.seed == 1)].run_id.iloc[0]
    add_estimate(two, iwae1, dict(loaded.log_px(iwae1) - 2.0))  # seed 1: the IWAE now 1 nat worse (the same range, rewritten)
    assert _verdicts(two)["(1)"] == NR


def test_a_claim_that_log_p_goes_down_keeps_the_one_seed_qualifier():
    """Claim (3)'s IWAE -> VAE row reads the verdict the other way round: the qualifier survives the flip."""
    assert flip("contradicted (one seed only)") == "holds (one seed only)"
    assert flip("holds") == "contradicted" and flip(NR) == NR


def test_pooled_gain_uses_only_the_images_every_seed_shares_and_students_t():
    """13 seeds whose image sets differ (seed s lacks image s): the pooled figure is over the images all
    13 share, each image's gain averaged over the seeds, and the 95% half-width is t(0.975, 12) times
    the sd of the per-seed gains over sqrt(13), t from a printed table: 2.1788."""
    rng = np.random.default_rng(1)
    n, seeds = 40, 13
    pairs, gains = [], []
    for s in range(seeds):
        ids = [i for i in range(n) if i != s]
        a = pd.Series(rng.normal(-100, 3, len(ids)), index=ids)
        d = pd.Series(0.3 * s + rng.normal(0, 0.5, len(ids)), index=ids)
        pairs.append((a, a + d))
        gains.append(d)
    shared = list(range(seeds, n))  # images 13..39: every seed has them
    by_hand = pd.concat([g.reindex(shared) for g in gains], axis=1)
    per_seed = by_hand.mean(axis=0).to_numpy()
    half = 2.1788 * np.std(per_seed, ddof=1) / math.sqrt(seeds)
    p = pooled(pairs)
    assert p.images == len(shared) and p.seeds == seeds
    assert p.mean == pytest.approx(by_hand.mean(axis=1).mean()) and p.se == pytest.approx(by_hand.mean(axis=1).std(ddof=1) / math.sqrt(len(shared)))
    assert p.half_width == pytest.approx(half, rel=1e-4) and t975(12) == pytest.approx(2.1788, abs=1e-4)
    assert t975(10) == pytest.approx(2.2281, abs=1e-4)  # not 2.0 past a lookup table's end


def test_a_smoke_cell_and_a_full_cell_of_the_same_epochs_are_separate_rows(res):
    """A 4-epoch pair on the first 400 training images (a smoke cut, scored with L_100) and a 4-epoch
    pair on all of them (L_5000) read as two labelled rows, each pairing its own runs; the smoke
    models' L_100 is never compared with the full models' L_5000."""
    from iwae.config import ScheduleConfig

    sched = ScheduleConfig(stages=2)
    for subset, est, base in ((400, "k100-seed123-block50", -170.0), (None, L5000, -97.0)):
        for obj, shift in (("vae", 0.0), ("iwae", 0.5)):
            cfg = run(obj, 5, 0, schedule=sched, train_subset=subset)
            add_run(res, cfg)
            add_estimate(res, cfg.run_id, seq([base + shift, base + shift - 1, base + shift + 1]), est)
    rows = _rows(table1(load(res)))
    assert len(rows) == 2, rows
    full = next(r for r in rows if r[4] == "paper")
    smoke = next(r for r in rows if r[4] == "first 400 training images")
    assert full[6] == "L_5000, 3 images" and full[7].startswith("97.00") and full[9].startswith("96.50") and full[11] == "0.50 ± 0.00", full
    assert smoke[6].startswith("L_100 (k100-seed123-block50)") and smoke[7].startswith("170.00") and smoke[11] == "0.50 ± 0.00", smoke


def test_the_headline_is_l5000_by_name_and_a_pair_is_compared_on_an_estimate_both_have(res):
    """A run with L_5000 and a larger k shows L_5000, not the larger k; a VAE scored only with L_100
    beside an IWAE scored with L_5000 and L_100 is compared on L_100."""
    vae, iwae = run("vae", 5, 0), run("iwae", 5, 0)
    for cfg in (vae, iwae):
        add_run(res, cfg)
    add_estimate(res, iwae.run_id, seq([-90.0, -91.0]), L5000)
    add_estimate(res, iwae.run_id, seq([-80.0, -81.0]), "k10000-seed123-block500")
    add_estimate(res, iwae.run_id, seq([-95.0, -96.0]), "k100-seed123-block50")
    add_estimate(res, vae.run_id, seq([-96.0, -97.0]), "k100-seed123-block50")
    loaded = load(res)
    assert loaded.headline_of(iwae.run_id) == L5000 and loaded.summary.set_index("run_id").loc[iwae.run_id, "nll"] == pytest.approx(90.5)
    (row,) = _rows(table1(loaded))
    assert row[6].startswith("L_100") and row[7].startswith("96.50") and row[9].startswith("95.50") and row[11] == "1.00 ± 0.00", row


def test_two_runs_the_rows_cannot_tell_apart_are_named_and_paired_with_nothing(res):
    """Two rows of an earlier layout (no config column) for one objective and seed in one cell, say two
    batch sizes: the report says so in one line and Table 1 pairs neither of them."""
    from dataclasses import replace

    a = run("vae", 5, 0)
    b = replace(a, schedule=replace(a.schedule, batch_size=10))
    i = run("iwae", 5, 0)
    for cfg in (a, b, i):
        add_run(res, cfg, legacy=True)
        add_estimate(res, cfg.run_id, seq([-100.0, -101.0]))
    loaded = load(res)
    assert len(loaded.notes) == 1 and a.run_id in loaded.notes[0] and b.run_id in loaded.notes[0], loaded.notes
    assert _rows(table1(loaded)) == [], table1(loaded)
