"""The benchmark command runs and prints its figures (no timing is asserted: speed is not a test)."""

import json

import pytest

from pipeline.cli import main

pytestmark = pytest.mark.slow


def test_bench_quick_prints_a_json_line(capsys, mnist_dir, tmp_path):
    """`bench --quick` prints a table and one JSON line with every figure, and writes it as Parquet."""
    import pandas as pd

    rc = main(["bench", "--quick", "--no-ray", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "bench.parquet")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "packed training" in out and "subnormals flushed" in out
    figures = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    for key in (
        "matmul_gflops",
        "train_l1_k1_ours",
        "train_l1_k50_ours",
        "train_l1_k5_pyro",
        "train_l1_k5_ratio",
        "eval_samples_per_s",
        "eval_roofline_fraction",
        "eval_peak_rss_mib",
        "ais_s_per_image_per_temperature",
        "ais_T500_over_k5000",
        "pack_k50_G1",
        "pack_k50_G4",
        "solo_k50_denormals_kept",
        "solo_k50_flush_speedup",
    ):
        assert key in figures and figures[key] > 0, key
    assert pd.read_parquet(tmp_path / "bench.parquet").loc[0, "eval_flops_per_sample"] == figures["eval_flops_per_sample"]
