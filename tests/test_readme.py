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
    code, duck = python_blocks("## Results in pandas")
    assert '"results/demo/tables/runs"' in code and 'read_estimates("results/demo")' in code
    code = code.replace('"results/demo', f'"{tmp_path}/results/demo')
    code = code.replace('/results/demo")', '/results/demo", estimate="k100-seed123-block50")')  # the smoke demo's estimate, not L_5000
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(scope["t"]) == 2 and scope["t"]["nll"].notna().all()
    import duckdb

    assert "'results/demo/tables/eval/*/*/*.parquet'" in duck
    got = duckdb.sql(re.search(r'duckdb.sql\("(.*)"\)', duck).group(1).replace("'results/demo", f"'{tmp_path}/results/demo")).df()
    ev = scope["ev"]
    assert set(got.estimate) == {"k100-seed123-block50", "k100-seed123-block50-pruned"}
    mine = got[got.estimate == "k100-seed123-block50"].set_index("run_id").mean_log_px.sort_index()
    theirs = ev.groupby("run_id", observed=True).log_px.mean().sort_index()
    assert list(mine.index) == [str(i) for i in theirs.index] and (mine.to_numpy() - theirs.to_numpy()).max() < 1e-9


def blocks() -> list[tuple[str, str]]:
    """Every fenced block of the README: (its language, its text)."""
    return re.findall(r"```(\w*)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


# each README block, by its first line, and the test that runs or checks it
COVERED = {
    "make demo": "test_make_targets_exist",
    "import torch, iwae": "test_notebook_snippet_runs",
    "iwae-pipeline data fetch mnist": "test_every_command_line_parses",
    "# my_vae.py: a VAE trained elsewhere": "test_the_user_vae_and_its_notebook_scoring_run",
    "import torch": "test_the_user_vae_and_its_notebook_scoring_run",
    "# my_pyro_vae.py: the same networks as a Pyro model and guide": "test_the_user_vae_and_its_notebook_scoring_run",
    "import pandas as pd": "test_pandas_snippet_runs_on_the_demo_results",
    "import duckdb": "test_pandas_snippet_runs_on_the_demo_results",
    "from pipeline.store.estimates import read_estimates": "tests/test_cluster.py::test_readme_pandas_snippet_reads_results_from_s3",
}


def test_every_block_has_a_test():
    """A block added to the README without a test that runs it fails here."""
    firsts = [text.splitlines()[0] for _, text in blocks()]
    missing = [f for f in firsts if not any(f.startswith(k) for k in COVERED)]
    assert not missing, f"README blocks with no test: {missing}"
    assert len(firsts) == len(COVERED), firsts


def test_make_targets_exist():
    """The two commands at the top are targets of the Makefile."""
    (make,) = [t for _, t in blocks() if t.startswith("make demo")]
    targets = re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), re.M)
    for line in make.splitlines():
        assert line.split()[1] in targets, line


def test_every_command_line_parses():
    """Each `iwae-pipeline ...` line of the command-line block names a command and options that exist,
    with values they accept (click parses it as the CLI would, without running it)."""
    import shlex

    import typer

    from pipeline.cli import app

    (cli_block,) = [t for _, t in blocks() if t.startswith("iwae-pipeline data fetch mnist")]
    group = typer.main.get_command(app)
    lines = [ln.split("  #")[0].strip() for ln in cli_block.splitlines() if ln.strip()]
    assert len(lines) >= 15 and all(ln.startswith("iwae-pipeline ") for ln in lines)
    for line in lines:
        args = shlex.split(line)[1:]
        cmd = group
        while hasattr(cmd, "commands"):  # a group (`data`): descend to the command
            name, args = args[0], args[1:]
            assert name in cmd.commands, f"{line}: no command {name}"
            cmd = cmd.commands[name]
        try:
            cmd.make_context(cmd.name, list(args))  # typer's own click: its errors are TyperExceptions
        except typer.TyperException as e:
            pytest.fail(f"{line}: {e.format_message() if hasattr(e, 'format_message') else e}")
    bad = group.commands["evaluate"]
    with pytest.raises(typer.TyperException):  # the check can fail: an option evaluate does not have
        bad.make_context("evaluate", ["paper_table1", "--steps", "3"])


def test_the_user_vae_and_its_notebook_scoring_run(mnist_dir, tmp_path, monkeypatch):
    """'Score anyone's model': the user's VAE module as written (its weights saved beside it), and the
    notebook form that scores it without Ray (8 images at k=50 here)."""
    text = (ROOT / "README.md").read_text()
    module = re.search(r"<!-- user-vae -->\s*```python\n(.*?)```", text, re.S).group(1)
    notebook = re.search(r"<!-- notebook-score -->\s*```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "my_vae.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import torch

    mod = importlib.import_module("my_vae")
    state = {f"enc.{k}": v for k, v in mod.enc.state_dict().items()} | {f"dec.{k}": v for k, v in mod.dec.state_dict().items()}
    torch.save(state, tmp_path / "my_vae.pt")
    assert 'load_mnist("data")' in notebook and "k=5000" in notebook and "[:500]" in notebook and "range(500)" in notebook
    code = notebook.replace('load_mnist("data")', f"load_mnist({str(mnist_dir)!r})").replace("k=5000", "k=50")
    code = code.replace("[:500]", "[:8]").replace("range(500)", "range(8)")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["est"].log_px.shape == (8,) and torch.isfinite(scope["est"].log_px).all()
    pyro_module = re.search(r"<!-- pyro-vae -->\s*```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "my_pyro_vae.py").write_text(pyro_module)
    from iwae.evaluate import EvalConfig, estimate_log_px

    pyro_vae = importlib.import_module("my_pyro_vae").make_model()
    again = estimate_log_px(pyro_vae, scope["x"], scope["ids"], EvalConfig(k=50))
    torch.testing.assert_close(again.log_px, scope["est"].log_px, rtol=0, atol=1e-4)  # the same networks, the same per-image numbers


def test_the_score_section_is_a_five_minute_read():
    """No prose paragraph of 'Score anyone's model' runs over 150 words."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Score anyone's model") : text.index("\n## ", text.index("## Score anyone's model") + 5)]
    prose = [p for p in re.split(r"\n\s*\n", re.sub(r"```.*?```", "", section, flags=re.S)) if p.strip() and not p.startswith(("#", "<!--"))]
    assert prose and max(len(p.split()) for p in prose) <= 150, [len(p.split()) for p in prose]


def test_the_readme_picture_is_there():
    for path in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (ROOT / "README.md").read_text()):
        assert (ROOT / path).is_file(), path
