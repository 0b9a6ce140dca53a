"""Experiment grids: the paper's cells, schedule cuts, and `--where` selection (no Ray, no data)."""

import pytest

import jobs


def test_table1_trains_k1_once_and_covers_the_paper_grid():
    """L_1 is the ELBO, so k=1 is one model: 2 datasets x 2 layer counts x (1 + 2 + 2) = 20 cells,
    and the k=5 and k=50 cells have a second seed (16 more runs); seed=0 is the paper's 20."""
    j = jobs.build("paper_table1")
    cells = {(r.dataset, len(r.model.latent), r.objective.name, r.objective.k) for r in j.runs}
    assert len(cells) == 20 and len(j.runs) == 36 and len({r.run_id for r in j.runs}) == 36
    assert len(jobs.select(j, ["seed=0"]).runs) == 20 and all(r.objective.k > 1 for r in jobs.select(j, ["seed=1"]).runs)
    assert ("mnist", 1, "iwae", 1) not in cells and ("mnist", 1, "vae", 1) in cells and ("omniglot", 2, "iwae", 50) in cells
    assert all(r.schedule.total_epochs == 3280 for r in j.runs) and j.train_images > 0 and j.pruned


def test_table2_continues_for_the_length_of_the_last_stage():
    """The paper continues 3,280-epoch runs for 3^7 epochs (its last stage); a cut to N stages
    continues for 3^(N-1), and the continued runs start from the cut Table 1 runs."""
    full, cut = jobs.build("paper_table2"), jobs.build("paper_table2", stages=3)
    assert [r.schedule.total_epochs for r in full.runs] == [2187] * 4
    assert [r.schedule.total_epochs for r in cut.runs] == [9] * 4 and all(r.schedule.lr == 1e-4 for r in cut.runs)
    swaps = [(r.objective.name, r.objective.k) for r in cut.runs]
    assert swaps == [("iwae", 50), ("vae", 1), ("vae", 1), ("iwae", 50)]  # two swaps, then the two controls
    t1 = {r.run_id for r in jobs.build("paper_table1", stages=3).runs}
    assert {r.init_from for r in cut.runs} <= t1 and not cut.pruned


def test_where_keeps_matching_runs_and_refuses_unknown_keys():
    j = jobs.select(jobs.build("paper_table1", stages=2), ["dataset=mnist", "layers=1", "seed=0"])
    assert sorted((r.objective.name, r.objective.k) for r in j.runs) == [("iwae", 5), ("iwae", 50), ("vae", 1), ("vae", 5), ("vae", 50)]
    assert jobs.select(j, []) is j
    est = jobs.select(jobs.build("estimators"), ["objective=iwae,piwae"])
    assert sorted((r.objective.name, r.estimator) for r in est.runs) == [("iwae", "dreg"), ("iwae", "standard"), ("iwae", "stl"), ("piwae", "standard")]
    with pytest.raises(ValueError, match="KEY one of"):
        jobs.select(j, ["colour=red"])
    with pytest.raises(ValueError, match="keeps none"):
        jobs.select(j, ["k=7"])


def test_run_id_does_not_depend_on_how_a_number_is_spelled():
    """epoch_scale=1 and epoch_scale=1.0 (and lr=1e-4 given as an int-like float) are one run, one id."""
    from iwae.config import RunConfig, ScheduleConfig

    a = RunConfig(schedule=ScheduleConfig(stages=2, epoch_scale=1))
    b = RunConfig(schedule=ScheduleConfig(stages=2, epoch_scale=1.0))
    assert a.run_id == b.run_id and str(a.flat()) == str(b.flat())  # str: flat() holds a NaN (beta)
    assert RunConfig.from_dict(a.to_dict()).run_id == a.run_id
    assert RunConfig(schedule=ScheduleConfig(stages=2, epoch_scale=2)).run_id != a.run_id


def test_config_carries_typed_objective_and_estimator():
    """A dict objective and a string estimator are parsed once, in the config; the id is the same either way."""
    from iwae.bounds import IWAE
    from iwae.config import Estimator, RunConfig

    a = RunConfig(objective={"name": "iwae", "k": 5}, estimator="dreg")
    b = RunConfig(objective=IWAE(k=5), estimator=Estimator.dreg)
    assert a.objective == IWAE(k=5) and a.estimator is Estimator.dreg and a.run_id == b.run_id
    assert a.to_dict()["objective"] == {"k": 5, "name": "iwae"} and a.to_dict()["estimator"] == "dreg"
    with pytest.raises(TypeError, match="unknown objective"):
        RunConfig(objective={"name": "elbo9", "k": 1})
    with pytest.raises(ValueError, match="unknown estimator"):
        RunConfig(estimator="reinforce")
