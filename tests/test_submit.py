"""Ray Jobs: submit a smoke job from the CLI to a real `ray start --head` on 127.0.0.1."""

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A real Ray head on loopback with its dashboard (Jobs API) on a free port.

    The agent port is free too: the default 52365 may be held by another Ray on this machine
    (the embedded one other tests start), and the head's job agent would then never come up.
    """
    tmp = tmp_path_factory.mktemp("head")
    gcs, dash, agent = free_port(), free_port(), free_port()
    # the head's Python has the project installed, as on a real cluster (cluster.yaml's setup_commands)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}:{os.environ['PATH']}"}
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={gcs}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent}",
        "--num-cpus=2",
        f"--temp-dir={tmp}/ray",
        "--include-dashboard=true",
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    TEMPS[f"http://127.0.0.1:{dash}"] = tmp / "ray"
    yield f"http://127.0.0.1:{dash}", env
    stop_ray_under(tmp / "ray")


TEMPS: dict = {}


def head_temp(address):
    """The head's Ray temp folder (where it unpacks a job's working folder)."""
    return TEMPS[address]


def stop_ray_under(temp_dir):
    """Stop only the Ray processes of this head: each one's command line names its temp dir.

    Not `ray stop`, which stops every Ray on the machine: it killed a researcher's sweep (ours)
    that was running beside `make test`.
    """
    pattern = str(temp_dir)
    for sig in ("-TERM", "-KILL"):
        subprocess.run(["pkill", sig, "-f", pattern], capture_output=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0:
            time.sleep(0.2)


def test_submit_status_logs_on_a_local_head(head, tmp_path, mnist_dir, monkeypatch):
    """`submit --wait` runs the smoke demo on the cluster; its Parquet output is there; status and logs work."""
    address, env = head
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    results = tmp_path / "results"
    runner = CliRunner()
    r = runner.invoke(
        app, ["submit", "demo", "--size", "smoke", "--address", address, "--results", str(results), "--data-dir", str(mnist_dir), "--wait", "--timeout", "600"]
    )
    sid = [w for w in r.output.split() if w.startswith("raysubmit_")][0] if "raysubmit_" in r.output else ""
    if r.exit_code != 0:
        logs = runner.invoke(app, ["logs", sid, "--address", address]).output if sid else ""
        pytest.fail(f"submit failed: {r.output[-2000:]}\n--- job logs ---\n{logs[-4000:]}")
    assert "SUCCEEDED" in r.output
    from pipeline.store.estimates import read_estimates

    ev = read_estimates(str(results), estimate="k100-seed123-block50")
    assert len(ev) == 40 and not ev.duplicated(["run_id", "image_id"]).any()
    st = runner.invoke(app, ["status", sid, "--address", address])
    assert st.exit_code == 0 and "SUCCEEDED" in st.output
    lg = runner.invoke(app, ["logs", sid, "--address", address])
    assert lg.exit_code == 0 and "demo: done" in lg.output
    again = runner.invoke(app, ["submit", "demo", "--size", "smoke", "--address", address, "--results", str(results), "--submission-id", sid])
    assert again.exit_code == 2 and "already exists" in again.output


def test_submit_uploads_the_project_not_the_folder_it_is_run_from(head, tmp_path, mnist_dir, monkeypatch):
    """Run from a folder outside the project that holds secret-looking files: the job's working folder
    on the head is the project's source tree (its pyproject.toml is there), and no file of that folder
    reaches the head; a `.env` in the project itself is excluded too. `--wait --timeout 1` on a job that
    runs longer says it is still running and exits 3; the job is then stopped, and `stop`/`logs` of an
    unknown id are one line each."""
    address, env = head
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "deploy-key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    (elsewhere / "notes.txt").write_text("mine")
    dotenv = ROOT / ".env"
    assert not dotenv.exists()
    dotenv.write_text("AWS_SECRET_ACCESS_KEY=example\n")
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    runner = CliRunner()
    try:
        argv = ["submit", "demo", "--size", "smoke", "--address", address, "--results", str(tmp_path / "r"), "--data-dir", str(mnist_dir)]
        r = runner.invoke(app, [*argv, "--wait", "--timeout", "1"])
    finally:
        dotenv.unlink()
    sid = next(w for w in r.output.split() if w.startswith("raysubmit_"))
    assert r.exit_code == 3 and "is still running after 1 s and goes on on the cluster" in r.output, r.output
    assert runner.invoke(app, ["stop", sid, "--address", address]).exit_code == 0
    uploaded = [
        p
        for p in (head_temp(address) / "session_latest" / "runtime_resources").rglob("pyproject.toml")
        if p.read_text() == (ROOT / "pyproject.toml").read_text()
    ]
    assert uploaded, "the project's source tree is not the job's working folder"
    tree = {p.name for p in uploaded[0].parent.rglob("*")}
    assert {"iwae", "pipeline", "jobs"} <= tree and not {"deploy-key.pem", "notes.txt", ".env"} & tree, sorted(tree)[:50]
    for cmd in (["stop", "raysubmit_nope"], ["logs", "raysubmit_nope"], ["status", "raysubmit_nope"]):
        out = runner.invoke(app, [*cmd, "--address", address])
        assert out.exit_code == 2 and out.output.count("\n") == 1 and "no job raysubmit_nope" in out.output, out.output


def test_unreachable_address_fails_fast_with_one_line():
    """An address where nothing listens gives exit 2 and a one-line error, in seconds."""
    r = CliRunner().invoke(app, ["status", "raysubmit_x", "--address", f"http://127.0.0.1:{free_port()}"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "cannot reach" in r.output


def test_every_sweep_option_reaches_the_submitted_job(monkeypatch, capsys):
    """submit takes every option of sweep (one definition for both) and the job's command line carries
    each, environment defaults included; parsed by sweep's own parser, it gives back every value."""
    from typer.main import get_command

    from pipeline import cli
    from pipeline.ray_backend import jobs as rb

    sent = {}
    monkeypatch.setattr(rb, "submit", lambda address, entry, root, sid, env, excludes=None: sent.update(entry=entry) or "raysubmit_x")
    monkeypatch.setenv("IWAE_DATA_DIR", "s3://bucket/data")
    argv = ["submit", "paper_table1", "--address", "http://127.0.0.1:9", "--results", "s3://bucket/r", "--size", "smoke", "--stages", "2"]
    argv += ["--epoch-scale", "0.5", "--where", "k=5", "--where", "seed=0", "--train-cpus", "2", "--train-gpus", "1", "--pack", "4", "--compile", "off"]
    argv += ["--retries", "5", "--no-eval", "--test-images", "30", "--train-images", "7", "--eval-cpus", "3", "--eval-gpus", "0.5", "--eval-workers", "9"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    entry = sent["entry"]
    assert entry.startswith("python3 -m pipeline.preflight && python3 -m pipeline.cli sweep ")
    sweep = get_command(cli.app).commands["sweep"]
    ctx = sweep.make_context("sweep", shlex.split(entry.split("python3 -m pipeline.cli ", 1)[1])[1:])
    got = {k: (v.value if hasattr(v, "value") else v) for k, v in ctx.params.items()}
    want = {"job": "paper_table1", "size": "smoke", "stages": 2, "epoch_scale": 0.5, "where": ["k=5", "seed=0"], "train_cpus": 2.0, "train_gpus": 1.0}
    want |= {"pack": "4", "compile_step": "off", "retries": 5, "evaluate_after": False, "test_images": 30, "train_images": 7, "eval_cpus": 3.0}
    want |= {"eval_gpus": 0.5, "eval_workers": 9, "results": "s3://bucket/r", "data_dir": "s3://bucket/data"}
    assert {k: got[k] for k in want} == want, got
    untested = {p.name for p in sweep.params} - set(want) - {"address"}
    assert not untested, f"sweep options this test does not set: {untested}"
