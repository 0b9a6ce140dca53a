"""The README's code blocks run as written (with tiny settings swapped in), so they cannot rot."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "iwae-pipeline")


def python_blocks(heading: str) -> list[str]:
    """The ```python blocks of the README section that starts with ``heading``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)


def test_notebook_snippet_runs(mnist_dir, capsys):
    """'From a notebook': train, evaluate with k=5000, read the reliability figures (1,000 training images here)."""
    (code,) = python_blocks("## From a notebook")
    assert 'load_mnist("data")' in code
    code = code.replace('load_mnist("data")', f"load_mnist({str(mnist_dir)!r})").replace("iwae.RunConfig(", "iwae.RunConfig(train_subset=1000, ")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    est = scope["est"]
    assert est.log_px.shape == (100,) and est.prefix.shape == (100, 5) and est.khat.shape == (100,)
    nll, share = (float(v) for v in capsys.readouterr().out.split())
    assert 80 < nll < 300 and 0 <= share <= 1


@pytest.mark.slow
def test_pandas_snippet_runs_on_the_demo_results(mnist_dir, tmp_path):
    """'Results in pandas': the Table 1 snippet on what `make demo` writes (the smoke demo here)."""
    results = tmp_path / "results" / "demo"
    r = subprocess.run([CLI, "sweep", "demo", "--size", "smoke", "--results", results, "--data-dir", mnist_dir], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (code,) = python_blocks("## Results in pandas")
    assert '"results/demo/tables/runs"' in code and 'read_estimates("results/demo")' in code
    code = code.replace('"results/demo', f'"{tmp_path}/results/demo')
    code = code.replace('/results/demo")', '/results/demo", estimate="k100-seed123-block50")')  # the smoke demo's estimate, not L_5000
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(scope["t"]) == 2 and scope["t"]["nll"].notna().all()
