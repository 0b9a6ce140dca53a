"""The in-process commands (train, report, bench --no-ray, repro) run where Ray is not installed."""

import json
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
    """`repro` on CPU with a tiny budget and a cut test set: the k=50 pair trained for the stages that
    fit, scored, reported, the paired gain in repro.json; a re-run keeps its stage count and trains nothing."""
    res = tmp_path / "rp"
    argv = ["repro", "--minutes", "1", "--seed", "0", "--train-subset", "200", "--test-images", "20", "--train-images", "10"]
    argv += ["--results", str(res), "--data-dir", str(mnist_dir)]
    assert main(argv) == 0, capsys.readouterr().err
    fig = json.loads((res / "repro.json").read_text())
    assert 1 <= fig["stages"] <= 8 and fig["epochs"] == sum(3**i for i in range(fig["stages"]))
    assert [r["objective"] for r in fig["runs"]] == ["iwae", "vae"] and all(r["test_images"] == 20 for r in fig["runs"])
    assert fig["gains"]["0"]["images"] == 20 and fig["bench"]["pack_k50_G1"] > 0
    assert (res / "report" / "report.md").exists()
    runs = pd.read_parquet(res / "tables" / "runs")
    assert len(runs) == 2 and (runs.epochs_trained == fig["epochs"]).all()
    assert main(argv) == 0  # resumed: same runs, nothing left to train
    again = json.loads((res / "repro.json").read_text())
    assert again["stages"] == fig["stages"] and again["train_seconds"] < 5
