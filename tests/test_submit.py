"""Ray Jobs: submit a smoke job from the CLI to a real `ray start --head` on 127.0.0.1."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
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
    yield f"http://127.0.0.1:{dash}", env
    stop_ray_under(tmp / "ray")


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
    ev = pd.read_parquet(results / "tables" / "eval")
    assert len(ev) == 40 and not ev.duplicated(["run_id", "image_id"]).any()
    st = runner.invoke(app, ["status", sid, "--address", address])
    assert st.exit_code == 0 and "SUCCEEDED" in st.output
    lg = runner.invoke(app, ["logs", sid, "--address", address])
    assert lg.exit_code == 0 and "demo: done" in lg.output
    again = runner.invoke(app, ["submit", "demo", "--size", "smoke", "--address", address, "--results", str(results), "--submission-id", sid])
    assert again.exit_code == 2 and "already exists" in again.output


def test_unreachable_address_fails_fast_with_one_line():
    """An address where nothing listens gives exit 2 and a one-line error, in seconds."""
    r = CliRunner().invoke(app, ["status", "raysubmit_x", "--address", f"http://127.0.0.1:{free_port()}"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "cannot reach" in r.output
