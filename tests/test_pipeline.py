"""The Ray pipeline end to end on a real local Ray: sweeps, resume, idempotent sharded evaluation."""

import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.store.estimates import read_estimates

pytestmark = pytest.mark.slow
runner = CliRunner()
SMOKE = "k100-seed123-block50"  # the smoke jobs' estimate


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def swept(tmp_path_factory, ray_local, mnist_dir):
    """The demo job at smoke size, swept once for the module."""
    results = tmp_path_factory.mktemp("res") / "results"
    r = cli("sweep", "demo", "--size", "smoke", "--results", results, "--data-dir", mnist_dir)
    assert r.exit_code == 0, r.output
    return results, r.output


def estimate(results, name=SMOKE):
    """One estimate of a results folder through the one reader, indexed by (run_id, image_id)."""
    return read_estimates(str(results), estimate=name).set_index(["run_id", "image_id"]).sort_index()


def test_smoke_sweep_writes_every_table_once(swept):
    """A sweep trains every cell, evaluates every test image once per run, writes the report."""
    results, output = swept
    runs = pd.read_parquet(results / "tables" / "runs")
    ev = estimate(results).reset_index()
    train = pd.read_parquet(results / "tables" / "train")
    assert len(runs) == 2 and set(runs.status) == {"done"} and set(runs.objective) == {"vae", "iwae"}
    assert len(ev) == 40 and not ev.duplicated(["run_id", "image_id"]).any() and len(estimate(results, SMOKE + "-pruned")) == 40
    assert ev.log_px.between(-800, 0).all() and (ev.l_1 <= ev.log_px + 5).all()
    assert set(train.run_id) == set(runs.run_id)
    assert (results / "report" / "report.md").exists() and (results / "report" / "training_curves.png").exists()
    assert "Table 1" in output and "mnist | 1 | 5" in output


def test_resumed_sweep_trains_and_writes_nothing_again(swept, mnist_dir):
    """Running the same sweep again retrains nothing and adds no rows."""
    results, _ = swept
    before = {p: p.stat().st_mtime_ns for p in (results / "tables").rglob("*.parquet")}
    r = cli("sweep", "demo", "--size", "smoke", "--results", results, "--data-dir", mnist_dir)
    assert r.exit_code == 0, r.output
    after = {p: p.stat().st_mtime_ns for p in (results / "tables").rglob("*.parquet")}
    assert before == after
    assert len(estimate(results)) == 40


def test_evaluation_rerun_only_fills_missing_ranges(swept, mnist_dir):
    """Deleting one range file and evaluating again rewrites just that range; rows never double."""
    results, _ = swept
    victim = sorted((results / "tables" / "eval").glob(f"*/estimate={SMOKE}/images-*.parquet"))[0]
    kept = pd.read_parquet(victim)
    victim.unlink()
    r = cli("evaluate", "demo", "--size", "smoke", "--results", results, "--data-dir", mnist_dir)
    assert r.exit_code == 0, r.output
    ev = estimate(results)
    assert len(ev) == 40 and not ev.index.duplicated().any()
    pd.testing.assert_frame_equal(pd.read_parquet(victim), kept)  # identity seeds: the same numbers again


def test_estimates_do_not_depend_on_the_ranges_they_were_scored_in(swept, tmp_path, mnist_dir):
    """The first 7 test images scored first, then the rest as a range of their own, on 2 workers, give
    the same estimates as all 20 in one range; a run shared by two commands is scored once."""
    results, _ = swept
    other = tmp_path / "reranged"
    shutil.copytree(results, other, ignore=shutil.ignore_patterns("eval", "tune", "report"))
    r = cli("evaluate", "demo", "--size", "smoke", "--test-images", "7", "--results", other, "--data-dir", mnist_dir, "--eval-workers", "2")
    assert r.exit_code == 0, r.output
    r = cli("evaluate", "demo", "--size", "smoke", "--results", other, "--data-dir", mnist_dir, "--eval-workers", "2")
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (other / "tables" / "eval").glob(f"*/estimate={SMOKE}/*.parquet"))
    assert names == sorted(["images-00000-00006.parquet", "images-00007-00019.parquet"] * 2), names
    a, b = estimate(results), estimate(other)
    assert len(b) == 40
    pd.testing.assert_series_equal(a.log_px, b.log_px, atol=1e-4, rtol=0)
    pd.testing.assert_series_equal(a.l_50, b.l_50, atol=1e-4, rtol=0)


def test_report_rebuilds_from_parquet_alone(swept, tmp_path):
    """`report` needs only the tables: it renders Table 1, all runs and the plots."""
    results, _ = swept
    r = cli("report", "--results", results, "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "lk_vs_k.png").exists() and (tmp_path / "rep" / "summary.parquet").exists()
    summary = pd.read_parquet(tmp_path / "rep" / "summary.parquet")
    assert set(summary.columns) >= {"run_id", "nll", "nll_se", "nll_pruned", "active"}


def test_table2_starts_from_table1_and_estimators_run(tmp_path, ray_local, mnist_dir):
    """paper_table2 refuses to start before paper_table1 (trained in packs: a Tune trial per pack);
    afterwards its runs start from Table 1's checkpoints (model and Adam state) and continue below the scratch loss; the estimators grid
    (standard/STL/DReG, MIWAE, CIWAE, PIWAE) trains end to end. Table 1 also scores training
    images (the train-test gap); a run two jobs share is evaluated once."""
    results = tmp_path / "results"
    early = cli("sweep", "paper_table2", "--size", "smoke", "--results", results, "--data-dir", mnist_dir)
    assert early.exit_code == 2 and "paper_table1" in early.output
    t1 = cli("sweep", "paper_table1", "--size", "smoke", "--pack", "4", "--results", results, "--data-dir", mnist_dir)
    assert t1.exit_code == 0, t1.output
    packs = pd.read_parquet(results / "tables" / "runs").groupby("pack").run_id.count()
    assert sorted(packs.values) == [1, 2, 2]  # k=1 alone, VAE+IWAE at k=5 and at k=50
    tr, ev1 = read_estimates(str(results), "eval_train", SMOKE), estimate(results).reset_index()
    assert len(tr) == 5 * 20 and not tr.duplicated(["run_id", "image_id"]).any() and len(ev1) == 5 * 20
    assert "## Train-test gap" in t1.output and "| mnist | 1 | 1 |" in t1.output
    r = cli("sweep", "paper_table2", "--size", "smoke", "--results", results, "--data-dir", mnist_dir)
    assert r.exit_code == 0, r.output
    runs = pd.read_parquet(results / "tables" / "runs").set_index("run_id")
    swapped = runs[runs.init_from != ""]
    assert len(swapped) == 4 and set(swapped.init_from) <= set(runs.index)  # 2 swaps, 2 controls
    train = pd.read_parquet(results / "tables" / "train")
    for run_id, row in swapped.iterrows():
        src = train[train.run_id == row.init_from].sort_values("epoch")
        first = train[train.run_id == run_id].sort_values("epoch").iloc[0]
        assert first.train_bound > src.iloc[0].train_bound  # it continues, not from scratch
    ev = estimate(results).reset_index()
    assert set(swapped.index) <= set(ev.run_id)
    e = cli("sweep", "estimators", "--size", "smoke", "--results", results, "--data-dir", mnist_dir)
    assert e.exit_code == 0, e.output
    ev = estimate(results).reset_index()
    assert not ev.duplicated(["run_id", "image_id"]).any() and ev.groupby("run_id").size().eq(20).all()
    assert ev.run_id.nunique() == 5 + 4 + 5  # Table 1, Table 2, and the estimators but the shared IWAE k=50
    runs = pd.read_parquet(results / "tables" / "runs")
    est = runs[runs.k.isin([10, 50]) & (runs.train_subset == 400) & ((runs.estimator != "standard") | runs.objective.isin(["miwae", "ciwae", "piwae"]))]
    assert set(est.estimator) == {"standard", "stl", "dreg"} and set(est.objective) >= {"miwae", "ciwae", "piwae"} and set(est.status) == {"done"}
    rep = cli("report", "--results", results)
    assert rep.exit_code == 0 and "## Table 2: objective swap" in rep.output and "(control)" in rep.output


def test_ais_and_bdmc_ranges_give_the_same_estimates(swept, tmp_path, mnist_dir):
    """`evaluate --method ais`: 5 images at once, or 2 and then the other 3, give the same estimates
    (seeds by image id), each image once; BDMC's bounds land in their own table."""
    results, _ = swept
    tiny = ["--ais-steps", "4", "--ais-chains", "2", "--ais-leapfrog", "2"]
    ais = "T4-C2-L2-P100-seed0"
    out = {}
    for steps in (["5"], ["2", "5"]):
        other = tmp_path / f"s{len(steps)}"
        shutil.copytree(results, other, ignore=shutil.ignore_patterns("tune", "report"))
        for n in steps:
            r = cli("evaluate", "demo", "--size", "smoke", "--results", other, "--data-dir", mnist_dir, "--method", "ais", *tiny, "--ais-images", n)
            assert r.exit_code == 0, r.output
        out[len(steps)] = read_estimates(str(other), "ais", ais).set_index(["run_id", "image_id"]).sort_index()
    a, b = out[1], out[2]
    assert len(a) == len(b) == 10 and not a.index.duplicated().any()
    assert sorted(p.name for p in (tmp_path / "s2" / "tables" / "ais").glob(f"*/estimate={ais}/*")) == sorted(
        ["images-00000-00001.parquet", "images-00002-00004.parquet"] * 2
    )
    pd.testing.assert_series_equal(a.log_px_ais, b.log_px_ais)
    ev = estimate(results)
    assert (a.log_px_ais - ev.log_px.reindex(a.index)).abs().max() < 20  # the same images as the k-sample estimate
    assert a.accept.between(0, 1).all() and a.log_px_upper.isna().all()
    r = cli("evaluate", "demo", "--size", "smoke", "--results", tmp_path / "s2", "--data-dir", mnist_dir, "--method", "bdmc", *tiny, "--bdmc-images", "5")
    assert r.exit_code == 0, r.output
    bd = read_estimates(str(tmp_path / "s2"), "bdmc", ais)
    assert len(bd) == 10 and bd.log_px_upper.notna().all() and set(bd.method) == {"bdmc"}


def test_jobs_sharing_one_location_are_paired_only_within_their_cells(tmp_path, ray_local, mnist_dir):
    """The issue's new-user sequence into ONE location: `sweep demo --size smoke`; `sweep paper_table1
    --size smoke --where k=5` (the demo's runs: nothing trained or scored again); `sweep paper_table1
    --stages 2 --where layers=1 --where k=5 --where seed=0` (the same 4 epochs on all 60,000 training
    images, cut to 20 test and 20 training images); `sweep demo --test-images 20 --train-images 0` (those
    runs again: nothing new). Every command exits 0; Table 1 shows the smoke cell and the full cell as
    two labelled rows, each pairing its own VAE and IWAE on its own estimate; no pair crosses them. With
    the old key (dataset, layers, k, epochs, seed) the two cells were one row and a pair was dropped."""
    results = tmp_path / "one"
    common = ["--results", results, "--data-dir", mnist_dir]
    r = cli("sweep", "demo", "--size", "smoke", *common)
    assert r.exit_code == 0, r.output
    files = {p: p.stat().st_mtime_ns for p in (results / "tables").rglob("*.parquet") if "/eval_train/" not in str(p)}
    r = cli("sweep", "paper_table1", "--size", "smoke", "--where", "k=5", *common)
    assert r.exit_code == 0 and "2 runs (0 to train)" in r.output, r.output
    assert {p: p.stat().st_mtime_ns for p in files} == files  # shared runs: trained once, each image scored once
    full = [
        "--stages",
        "2",
        "--where",
        "dataset=mnist",
        "--where",
        "layers=1",
        "--where",
        "k=5",
        "--where",
        "seed=0",
        "--test-images",
        "20",
        "--train-images",
        "20",
    ]
    r = cli("sweep", "paper_table1", *full, *common)
    assert r.exit_code == 0 and "2 runs (2 to train)" in r.output, r.output
    files = {p: p.stat().st_mtime_ns for p in (results / "tables").rglob("*.parquet")}
    r = cli("sweep", "demo", "--test-images", "20", "--train-images", "0", *common)
    assert r.exit_code == 0 and "2 runs (0 to train)" in r.output, r.output
    assert {p: p.stat().st_mtime_ns for p in files} == files
    runs = pd.read_parquet(results / "tables" / "runs")
    assert len(runs) == 4 and runs.cell.nunique() == 2
    table = r.output.split("## Table 1")[1].split("\n\n")[1]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()[2:]]
    assert len(rows) == 2, table
    smoke = next(row for row in rows if row[4] == "first 400 training images")
    paper = next(row for row in rows if row[4] == "paper")
    assert smoke[3] == paper[3] == "4" and smoke[6].startswith("L_100 (k100-seed123-block50), 20 images") and paper[6] == "L_5000, 20 images", rows
    for row in (smoke, paper):
        assert row[7] != "-" and row[9] != "-" and row[11] != "-", row  # both runs of each cell, paired
    ev = read_estimates(str(results), estimate=None)
    assert not ev.duplicated(["run_id", "estimate", "image_id"]).any()
    assert set(ev[ev.run_id.isin(runs[runs.train_subset == 400].run_id)].estimate) == {SMOKE, SMOKE + "-pruned"}


DEMO_AS_A_USER_MODEL = '''
"""The demo's IWAE as a researcher would bring it: its encoder and decoder as distributions."""
import torch
from torch.distributions import Bernoulli, Independent

from iwae.adapter import DistributionModel, gaussian_encoder
from iwae.state import model_from_checkpoint
from pipeline.store.ledger import load_final
from pipeline.store.results import Results

RESULTS, RUN = {results!r}, {run!r}


def make_model():
    m, _ = model_from_checkpoint(load_final(Results.open(RESULTS, create=False), RUN), RUN, "cpu")
    adapted = DistributionModel(gaussian_encoder(m.encoders[0]), lambda h: Independent(Bernoulli(logits=m.decoder_x(h)), 1), m.cfg.latent[0])
    adapted.paper = m  # its weights: the key's digest
    return adapted
'''


def test_the_demo_model_through_score_and_the_adapter_gives_evaluates_numbers(swept, tmp_path, mnist_dir):
    """The demo's IWAE run, brought back as a user's model (encoder and decoder distributions through
    the adapter) and scored by `score` on MNIST with the smoke estimate's k and block, gives the same
    per-image numbers as `evaluate` gave the run (same images, binarisation and seeds); the report's
    models table sets it beside the trained runs with a paired difference of zero."""
    results, _ = swept
    mine = tmp_path / "results"
    shutil.copytree(results, mine)
    runs = pd.read_parquet(mine / "tables" / "runs")
    run = runs[runs.objective == "iwae"].run_id.iloc[0]
    (tmp_path / "demo_model.py").write_text(DEMO_AS_A_USER_MODEL.format(results=str(mine), run=run))
    r = cli("score", tmp_path / "demo_model.py:make_model", "--name", "demo-as-user", "--eval-k", 100, "--eval-block", 50, "--test-images", 20,
            "--results", mine, "--data-dir", mnist_dir)  # fmt: skip
    assert r.exit_code == 0, r.output
    ev = estimate(mine)
    user = [i for i in ev.index.get_level_values(0).unique() if i.startswith("demo-as-user-")]
    assert len(user) == 1
    theirs, ours = ev.loc[user[0]], ev.loc[run]
    assert len(theirs) == 20
    for col in ("log_px", "l_1", "l_5", "l_50", "ess", "khat", "mcse", "log_px_jk"):
        pd.testing.assert_series_equal(theirs[col], ours[col], atol=1e-4, rtol=0, check_names=False)
    r = cli("report", "--results", mine, "--data-dir", mnist_dir)
    assert r.exit_code == 0, r.output
    iwae = runs[runs.objective == "iwae"].label.iloc[0]
    pair = next(ln for ln in r.output.splitlines() if ln.startswith(f"| mnist | demo-as-user - {iwae} (trained here) |"))
    assert "| 20 | 0.00 ± 0.00 |" in pair, pair
