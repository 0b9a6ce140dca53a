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
