"""The in-process commands (train, report, bench --no-ray, repro) run where Ray is not installed."""

import json
import math
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from pipeline.cli import main

pytestmark = pytest.mark.slow

NO_RAY = textwrap.dedent(
    """
    import sys

    tried = []

    class NoRay:  # `import ray` (even inside try/except) is recorded and fails, as on a machine without it
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                tried.append(name)
                raise ImportError(name)
            return None

    sys.meta_path.insert(0, NoRay())
    from pipeline.cli import main
    for argv in {argvs!r}:
        rc = main(argv)
        if rc:
            sys.exit(rc)
    print("ray imported:", bool(tried))
    """
)


def run_without_ray(*argvs: list[str]) -> subprocess.CompletedProcess:
    code = NO_RAY.format(argvs=list(argvs))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def test_train_packs_runs_and_report_renders_them_without_ray(tmp_path):
    """`train` with two objectives and two seeds as one pack, then `report`, with `import ray` failing:
    four runs in the runs table, each naming its pack, and a report that shows them."""
    res = str(tmp_path / "res")
    common = ["--dataset", "synthetic", "--train-subset", "200", "--stages", "1", "--k", "3", "--eval-k", "50", "--test-images", "10"]
    p = run_without_ray(
        ["train", "--objective", "vae", "--objective", "iwae", "--seed", "0", "--seed", "1", "--pack", "4", *common, "--results", res],
        ["report", "--results", res],
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ray imported: False" in p.stdout
    runs = pd.read_parquet(tmp_path / "res" / "tables" / "runs")
    assert len(runs) == 4 and set(runs.status) == {"done"}
    assert runs.pack.nunique() == 1 and sorted(runs.pack.iloc[0].split("+")) == sorted(runs.run_id)
    assert "training 4 runs as one pack" in p.stderr
    assert (tmp_path / "res" / "report" / "report.md").exists()


def test_pack_option_is_checked(capsys):
    """A bad --pack is one line naming the choices, exit 2."""
    assert main(["train", "--pack", "many", "--dataset", "synthetic"]) == 2
    assert "--pack takes auto or a number" in capsys.readouterr().err


def test_repro_on_a_tiny_budget_trains_evaluates_and_resumes(mnist_dir, tmp_path, capsys):
    """`repro` on CPU with a tiny budget and a cut test set: the k=50 pairs (one layer, and two with
    --two-layer) trained for the stages that fit, scored with k=5000, AIS (with its T/2 check) and BDMC,
    reported, the paired gains and L_5000 against AIS in repro.json; a re-run keeps its stage count,
    trains and scores nothing, and keeps the first call's timings, which a call with other settings drops."""
    res = tmp_path / "rp"
    argv = ["repro", "--minutes", "0.5", "--seed", "0", "--train-subset", "200", "--test-images", "20", "--train-images", "10"]
    argv += ["--two-layer", "--ais-images", "3", "--bdmc-images", "2", "--ais-steps", "4", "--results", str(res), "--data-dir", str(mnist_dir)]
    assert main(argv) == 0, capsys.readouterr().err
    fig = json.loads((res / "repro.json").read_text())
    assert 1 <= fig["stages"] <= 8 and fig["epochs"] == sum(3**i for i in range(fig["stages"]))
    assert [(r["layers"], r["objective"]) for r in fig["runs"]] == [(1, "iwae"), (1, "vae"), (2, "iwae"), (2, "vae")]
    assert all(r["test_images"] == 20 for r in fig["runs"]) and all((r["active_h2"] is None) == (r["layers"] == 1) for r in fig["runs"])
    assert fig["gains"]["0"]["images"] == 20 and fig["gains"]["0-2layer"]["images"] == 20 and fig["bench"]["pack_k50_G1"] > 0
    assert [(e["method"], e["setting"][:3], e["images"]) for e in fig["ais_evaluations"]] == [("ais", "T4-", 3), ("ais", "T2-", 3), ("bdmc", "T4-", 2)]
    assert len(fig["ais"]) == 4 and all(a["images"] == 3 and a["bdmc_images"] == 2 and math.isfinite(a["gap"]) for a in fig["ais"].values())
    assert fig["ais_speed"]["device"]["ais_s_per_image_per_temperature"] > 0
    report = (res / "report" / "report.md").read_text()
    assert "Convergence: each run's AIS as T doubles" in report and "| 2 → 4 | 3 |" in report and ", by AIS (T=4, 3 images)" in report
    runs = pd.read_parquet(res / "tables" / "runs")
    assert len(runs) == 4 and (runs.epochs_trained == fig["epochs"]).all()
    # as a sweep scores them: the pruned models on the test images only, so the estimates a sweep of these runs writes are the same ones
    assert {p.name for p in (res / "tables" / "eval_train").glob("*/*")} == {"estimate=k5000-seed123-block500"}
    assert {p.name for p in (res / "tables" / "eval").glob("*/*")} == {"estimate=k5000-seed123-block500", "estimate=k5000-seed123-block500-pruned"}
    capsys.readouterr()
    assert main(argv) == 0  # resumed: same runs, nothing left to train or score
    assert capsys.readouterr().err.count("(already scored)") == 3
    again = json.loads((res / "repro.json").read_text())
    assert again["stages"] == fig["stages"] and pd.read_parquet(res / "tables" / "runs").train_seconds.tolist() == runs.train_seconds.tolist()
    assert [again[k] for k in ("train_seconds", "eval_seconds", "ais_evaluations")] == [fig[k] for k in ("train_seconds", "eval_seconds", "ais_evaluations")]
    other = [*argv[: argv.index("--bdmc-images") + 1], "0", *argv[argv.index("--bdmc-images") + 2 :]]
    assert main(other) == 0  # another call on the same runs: the first call's timings do not describe it
    third = json.loads((res / "repro.json").read_text())
    assert third["config"]["bdmc_images"] == 0 and len(third["ais_evaluations"]) == 2 and third["train_seconds"] != fig["train_seconds"]
