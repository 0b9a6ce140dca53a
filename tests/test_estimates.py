"""Estimates keyed by what they measure, in fixed image ranges: more images means more ranges, any
command reuses what is written, and the one reader counts each image once."""

import shutil
from pathlib import Path

import pandas as pd
import pytest

from iwae.config import RunConfig, ScheduleConfig
from iwae.evaluate import EvalConfig
from pipeline.datasource import DataSource
from pipeline.driver import evaluate_here
from pipeline.store.estimates import EvalPlan, Span, read_estimates, spans
from pipeline.store.ledger import EstimateLedger
from pipeline.store.results import Results
from pipeline.work import train_in_process


def test_ranges_are_contiguous_and_never_straddle_a_fixed_range():
    """Missing images become ranges cut at gaps and at every multiple of the range size."""
    missing = [*range(20, 500), *range(500, 1000), 1203, 1204, 1500]
    assert spans("r", missing, 500) == [Span("r", 20, 499), Span("r", 500, 999), Span("r", 1203, 1204), Span("r", 1500, 1500)]
    assert spans("r", range(0, 1001), 500) == [Span("r", 0, 499), Span("r", 500, 999), Span("r", 1000, 1000)]
    assert spans("r", [], 500) == []


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_dir):
    """One tiny MNIST run (200 training images, 1 epoch), trained in this process."""
    res = Results.open(str(tmp_path_factory.mktemp("est") / "res"))
    data = DataSource.open(str(mnist_dir))
    cfg = RunConfig(objective={"name": "vae", "k": 1}, schedule=ScheduleConfig(stages=1), train_subset=200)
    train_in_process([cfg], res, data, pack_limit=1)
    return res, data, cfg.run_id


def _files(res: Results, plan: EvalPlan, run_id: str) -> dict[str, int]:
    folder = Path(res.store.path(f"tables/{plan.table}/run_id={run_id}/estimate={plan.estimate}"))
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.parquet"))}


def test_more_images_scores_only_the_new_ranges_and_readers_count_each_image_once(trained, tmp_path):
    """20 images (as `train` scores them), then 500, then 1,000: each command scores only the ranges
    not yet written (known by name), a file once written is never rewritten, and the reader sees
    1,000 images once each. A stray copy of a range in an earlier layout (its folder, or a shard's
    name) is neither counted twice nor redone, and `repair` folds it into the current layout. A file
    whose name says other images than it holds counts by its name until `repair` reads it, moves it
    aside, and its range is scored again, to the same numbers."""
    from pipeline.store.ledger import check_location

    res, data, run_id = trained
    cfg = EvalConfig(k=20, block=10)
    for n in (20, 500):
        evaluate_here(res, data, [run_id], EvalPlan(cfg, n), show=False)
    before = _files(res, EvalPlan(cfg, 1), run_id)
    assert list(before) == ["images-00000-00019.parquet", "images-00020-00499.parquet"]
    sl = EstimateLedger(res, EvalPlan(cfg, 1000))
    assert sl.prepare([run_id]) == [Span(run_id, 500, 999)]  # only the new range is left
    assert evaluate_here(res, data, [run_id], EvalPlan(cfg, 1000), show=False) == 500
    after = _files(res, EvalPlan(cfg, 1), run_id)
    assert {k: after[k] for k in before} == before and "images-00500-00999.parquet" in after
    ev = read_estimates(res.location, estimate=EvalPlan(cfg, 1).estimate)
    assert len(ev) == 1000 and ev.image_id.is_unique and set(ev.image_id) == set(range(1000))
    folder = Path(res.store.path(f"tables/eval/run_id={run_id}/estimate={EvalPlan(cfg, 1).estimate}"))
    old = Path(res.store.path(f"tables/eval/{run_id}/{EvalPlan(cfg, 1).estimate}"))
    old.mkdir(parents=True)
    shutil.copy(folder / "images-00020-00499.parquet", old / "images-00020-00499.parquet")  # the earlier layout's folder
    shutil.copy(folder / "images-00020-00499.parquet", folder / "shard-00000-of-00002.parquet")  # an earlier layout's name
    assert len(read_estimates(res.location, estimate=EvalPlan(cfg, 1).estimate)) == 1000
    assert sl.prepare([run_id]) == []
    (folder / "images-00500-00999.parquet").rename(folder / "images-00500-00998.parquet")  # its name no longer says what it holds
    assert sl.prepare([run_id]) == [Span(run_id, 999, 999)]  # by name: no file is read to decide
    notes: list[str] = []
    done = check_location(res, notes.append)
    assert done["moved"] == 1 and "holds other images than its name says" in notes[0] and (Path(res.location) / "_quarantine").exists()
    assert done["migrated"] == 2 and not list(old.glob("*.parquet"))  # the old layout's copies, folded in (their range is there)
    assert sl.prepare([run_id]) == [Span(run_id, 500, 999)]
    evaluate_here(res, data, [run_id], EvalPlan(cfg, 1000), show=False)
    again = read_estimates(res.location, estimate=EvalPlan(cfg, 1).estimate).set_index("image_id").sort_index()
    pd.testing.assert_series_equal(again.log_px, ev.set_index("image_id").sort_index().log_px)  # seeded by image id: the same numbers


def test_the_pruned_model_is_its_own_estimate_on_the_same_draws(trained):
    """The pruned model's estimate lives beside the model's under its own name, on the same images; a
    second command asking for it scores nothing."""
    res, data, run_id = trained
    cfg = EvalConfig(k=20, block=10)
    evaluate_here(res, data, [run_id], EvalPlan(cfg, 40), show=False)
    assert evaluate_here(res, data, [run_id], EvalPlan(cfg, 40, pruned=True), show=False) == 40
    assert evaluate_here(res, data, [run_id], EvalPlan(cfg, 40, pruned=True), show=False) == 0
    both = read_estimates(res.location, estimate=None)
    model = both[both.estimate == "k20-seed123-block10"].set_index("image_id").log_px.sort_index()
    pruned = both[both.estimate == "k20-seed123-block10-pruned"].set_index("image_id").log_px.sort_index()
    assert len(pruned) == 40 and pruned.index.equals(model.index[:40]) and both[both.estimate.str.endswith("-pruned")].eval_pruned.all()
    assert (pruned - model[:40]).abs().max() < 5  # the same images and draws: close, whatever the units


def test_any_parquet_tool_reads_the_estimates_as_the_one_reader_does(trained):
    """The estimate folders are hive-style: DuckDB and pandas, with no project code, see ``run_id`` and
    ``estimate`` as columns and give the same per-estimate means and counts as ``read_estimates``."""
    import duckdb

    res, data, run_id = trained
    evaluate_here(res, data, [run_id], EvalPlan(EvalConfig(k=7, block=7), 60), show=False)
    ours = read_estimates(res.location, estimate=None).groupby(["run_id", "estimate"], observed=True).log_px.agg(["mean", "count"])
    root = Path(res.location) / "tables" / "eval"
    sql = f"SELECT run_id, estimate, avg(log_px) AS mean, count(*) AS count FROM read_parquet('{root}/*/*/*.parquet', hive_partitioning = true) GROUP BY ALL"
    theirs = duckdb.sql(sql).df()
    pandas = pd.read_parquet(root).groupby(["run_id", "estimate"], observed=True).log_px.agg(["mean", "count"]).reset_index()

    def table(df: pd.DataFrame) -> dict:
        return {(str(r), str(e)): (round(float(m), 9), int(n)) for r, e, m, n in df[["run_id", "estimate", "mean", "count"]].itertuples(index=False)}

    assert len(ours) >= 2 and table(theirs) == table(ours.reset_index()) == table(pandas)


def test_an_estimates_name_carries_every_setting_that_changes_its_numbers():
    """Two AIS settings that differ only in the step-size adaptation get two names; the default keeps
    the name estimates were written under before (read as they are)."""
    from iwae.ais import AISConfig
    from pipeline.store.estimates import AISPlan, settings_of

    base = AISPlan(AISConfig(), 100)
    assert base.estimate == "T500-C16-L10-P100-seed0"
    names = {AISPlan(AISConfig(**kw), 100).estimate for kw in ({}, {"target_accept": 0.8}, {"step_size": 0.1}, {"step_min": 1e-5}, {"step_max": 0.4})}
    assert len(names) == 5 and "T500-C16-L10-P100-seed0-acc0.8" in names
    assert settings_of("T500-C16-L10-P100-seed0-acc0.8")["ais_steps"] == 500
