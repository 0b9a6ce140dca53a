"""The Ray pipeline end to end on a real local Ray: sweeps, resume, idempotent sharded evaluation."""

import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def swept(tmp_path_factory, ray_local, mnist_dir):
    """The demo job at smoke size, swept once for the module."""
    results = tmp_path_factory.mktemp("res") / "results"
    r = cli("sweep", "demo", "--size", "smoke", "--results", results, "--data-dir", mnist_dir, "--shards", "2")
    assert r.exit_code == 0, r.output
    return results, r.output


def test_smoke_sweep_writes_every_table_once(swept):
    """A sweep trains every cell, evaluates every test image once per run, writes the report."""
    results, output = swept
    runs = pd.read_parquet(results / "tables" / "runs")
    ev = pd.read_parquet(results / "tables" / "eval")
    train = pd.read_parquet(results / "tables" / "train")
    assert len(runs) == 2 and set(runs.status) == {"done"} and set(runs.objective) == {"vae", "iwae"}
    assert len(ev) == 40 and not ev.duplicated(["run_id", "image_id"]).any()
    assert ev.log_px.between(-800, 0).all() and (ev.l_1 <= ev.log_px + 5).all()
    assert set(train.run_id) == set(runs.run_id)
    assert (results / "report" / "report.md").exists() and (results / "report" / "training_curves.png").exists()
    assert "Table 1" in output and "mnist | 1 | 5" in output


def test_resumed_sweep_trains_and_writes_nothing_again(swept, mnist_dir):
    """Running the same sweep again retrains nothing and adds no rows."""
    results, _ = swept
    before = {p: p.stat().st_mtime_ns for p in (results / "tables").rglob("*.parquet")}
    r = cli("sweep", "demo", "--size", "smoke", "--results", results, "--data-dir", mnist_dir, "--shards", "2")
    assert r.exit_code == 0, r.output
    after = {p: p.stat().st_mtime_ns for p in (results / "tables").rglob("*.parquet")}
    assert before == after
    assert len(pd.read_parquet(results / "tables" / "eval")) == 40


def test_evaluation_rerun_only_fills_missing_shards(swept, mnist_dir):
    """Deleting one shard and evaluating again rewrites just that shard; rows never double."""
    results, _ = swept
    shard = sorted((results / "tables" / "eval").rglob("shard-*.parquet"))[0]
    kept = pd.read_parquet(shard)
    shard.unlink()
    r = cli("evaluate", "demo", "--size", "smoke", "--results", results, "--data-dir", mnist_dir, "--shards", "2")
    assert r.exit_code == 0, r.output
    ev = pd.read_parquet(results / "tables" / "eval")
    assert len(ev) == 40 and not ev.duplicated(["run_id", "image_id"]).any()
    pd.testing.assert_frame_equal(pd.read_parquet(shard), kept)  # identity seeds: the same numbers again


def test_estimates_identical_for_1_and_3_shards(swept, tmp_path, mnist_dir):
    """An image's estimate does not depend on how the test set is sharded across workers."""
    results, _ = swept
    other = tmp_path / "resharded"
    shutil.copytree(results, other, ignore=shutil.ignore_patterns("eval", "tune", "report"))
    r = cli("evaluate", "demo", "--size", "smoke", "--results", other, "--data-dir", mnist_dir, "--shards", "3", "--workers", "2")
    assert r.exit_code == 0, r.output
    one = cli("evaluate", "demo", "--size", "smoke", "--results", other, "--data-dir", mnist_dir, "--shards", "1")
    assert one.exit_code == 0, one.output  # a finished evaluation stands for any sharding: nothing is redone
    a = pd.read_parquet(results / "tables" / "eval").set_index(["run_id", "image_id"]).sort_index()
    b = pd.read_parquet(other / "tables" / "eval").set_index(["run_id", "image_id"]).sort_index()
    assert len(b) == 40 and b.shard.max() == 2
    sorted((other / "tables" / "eval").rglob("shard-*.parquet"))[0].unlink()
    one = cli("evaluate", "demo", "--size", "smoke", "--results", other, "--data-dir", mnist_dir, "--shards", "1")
    assert one.exit_code == 2 and "evaluated with shards=3" in one.output  # unfinished, other sharding: refused
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
    tr, ev1 = pd.read_parquet(results / "tables" / "eval_train"), pd.read_parquet(results / "tables" / "eval")
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
    ev = pd.read_parquet(results / "tables" / "eval")
    assert set(swapped.index) <= set(ev.run_id)
    e = cli("sweep", "estimators", "--size", "smoke", "--results", results, "--data-dir", mnist_dir)
    assert e.exit_code == 0, e.output
    ev = pd.read_parquet(results / "tables" / "eval")
    assert not ev.duplicated(["run_id", "image_id"]).any() and ev.groupby("run_id").size().eq(20).all()
    assert ev.run_id.nunique() == 5 + 4 + 5  # Table 1, Table 2, and the estimators but the shared IWAE k=50
    runs = pd.read_parquet(results / "tables" / "runs")
    est = runs[runs.k.isin([10, 50]) & (runs.train_subset == 400) & ((runs.estimator != "standard") | runs.objective.isin(["miwae", "ciwae", "piwae"]))]
    assert set(est.estimator) == {"standard", "stl", "dreg"} and set(est.objective) >= {"miwae", "ciwae", "piwae"} and set(est.status) == {"done"}
    rep = cli("report", "--results", results)
    assert rep.exit_code == 0 and "## Table 2: objective swap" in rep.output and "(control)" in rep.output


def test_ais_and_bdmc_shards_give_the_same_estimates(swept, tmp_path, mnist_dir):
    """`evaluate --method ais`: the same images in one shard or five give the same estimates (seeds by
    image id), each image once; a re-run writes nothing new; BDMC's bounds land in their own table."""
    results, _ = swept
    tiny = ["--steps", "4", "--chains", "2", "--leapfrog", "2", "--images", "5"]
    out = {}
    for shards in (1, 5):
        other = tmp_path / f"s{shards}"
        shutil.copytree(results, other, ignore=shutil.ignore_patterns("tune", "report"))
        r = cli("evaluate", "demo", "--size", "smoke", "--results", other, "--data-dir", mnist_dir, "--method", "ais", *tiny, "--shards", shards)
        assert r.exit_code == 0, r.output
        out[shards] = pd.read_parquet(other / "tables" / "ais").set_index(["run_id", "image_id"]).sort_index()
    a, b = out[1], out[5]
    assert len(a) == 10 and not a.index.duplicated().any() and b.shard.max() == 4
    pd.testing.assert_series_equal(a.log_px_ais, b.log_px_ais)
    ev = pd.read_parquet(results / "tables" / "eval").set_index(["run_id", "image_id"])
    assert (a.log_px_ais - ev.log_px.reindex(a.index)).abs().max() < 20  # the same images as the k=5000 estimate
    assert a.accept.between(0, 1).all() and a.log_px_upper.isna().all()
    r = cli("evaluate", "demo", "--size", "smoke", "--results", tmp_path / "s5", "--data-dir", mnist_dir, "--method", "bdmc", *tiny)
    assert r.exit_code == 0, r.output
    bd = pd.read_parquet(tmp_path / "s5" / "tables" / "bdmc")
    assert len(bd) == 10 and bd.log_px_upper.notna().all() and set(bd.method) == {"bdmc"}
