"""Security: loopback-only local Ray, no secret in output, cluster.yaml opens no Ray port to the world."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cluster_config import validate

ROOT = Path(__file__).resolve().parents[1]


def _descendants(pid):
    out, todo = set(), [pid]
    children = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    while todo:
        cur = todo.pop()
        out.add(cur)
        todo += children.get(cur, [])
    return out


@pytest.mark.slow
def test_embedded_ray_listens_on_loopback_only(ray_local):
    """Every socket the embedded Ray (this process's children) listens on is a loopback address."""

    @ray_local.remote
    class Probe:
        def ping(self):
            return 1

    a = Probe.remote()
    assert ray_local.get(a.ping.remote()) == 1
    ours = _descendants(os.getpid())
    ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    listening = []
    for line in ss.splitlines():
        pids = {int(p.split("=")[1]) for p in line.split("users:")[-1].replace(")", ",").split(",") if p.startswith("pid=")}
        if pids & ours:
            listening.append(line.split()[3])
    assert listening, "found no Ray listener at all"
    public = [addr for addr in listening if not addr.startswith(("127.", "[::ffff:127.", "[::1]", "localhost"))]
    assert not public, public


def test_submit_never_prints_the_auth_token(monkeypatch):
    """With token auth configured, a failing submit names the problem but never echoes the token."""
    secret = "s3cr3t-token-value-0123456789"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secret)
    r = CliRunner().invoke(app, ["submit", "demo", "--address", "http://127.0.0.1:9", "--size", "smoke"])
    assert r.exit_code == 2 and secret not in r.output


def test_shipped_cluster_yaml_passes_ray_and_our_rules():
    """cluster.yaml passes Ray's prepare_config/validate_config and our rules (GPU type, pins, ports)."""
    assert validate(ROOT / "cluster.yaml") == []
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert any(t["resources"].get("GPU", 0) >= 1 for t in cfg["available_node_types"].values())


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda c: c["available_node_types"]["gpu_worker"]["resources"].pop("GPU"), "GPU"),
        (lambda c: c["setup_commands"].__setitem__(0, "pip install ray torch"), "pin"),
        (
            lambda c: c["provider"]["security_group"]["IpPermissions"].append(
                {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
            ),
            "internet",
        ),
        (lambda c: c["available_node_types"]["head"].__setitem__("resourcez", {}), "Ray rejects"),
        (lambda c: c["head_start_ray_commands"].__setitem__(1, "ray start --head --dashboard-host=0.0.0.0"), "dashboard listens"),
    ],
)
def test_bad_cluster_yaml_is_named(tmp_path, mutate, expect):
    """Each rule catches its mistake, and the CLI reports it in one line with exit 2."""
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    mutate(cfg)
    bad = tmp_path / "cluster.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    problems = validate(bad)
    assert any(expect in p for p in problems), problems
    r = CliRunner().invoke(app, ["cluster-check", str(bad)])
    assert r.exit_code == 2 and expect in r.output


def test_malformed_cluster_yaml_gives_one_line(tmp_path):
    """Broken YAML: exit 2, one line naming the line number."""
    bad = tmp_path / "c.yaml"
    bad.write_text("cluster_name: x\nprovider: [unclosed\n")
    r = CliRunner().invoke(app, ["cluster-check", str(bad)])
    assert r.exit_code == 2 and "not valid YAML" in r.output and r.output.count("\n") == 1


@pytest.mark.parametrize("results, match", [(None, "--results (or IWAE_RESULTS) is needed"), ("results", "relative")])
def test_submit_refuses_results_that_would_land_in_the_jobs_temporary_folder(capsys, monkeypatch, results, match):
    """submit without --results, or with a relative one: exit 2, one line naming s3://, before contacting any cluster."""
    from pipeline.cli import main

    monkeypatch.delenv("IWAE_RESULTS", raising=False)
    argv = ["submit", "demo", "--address", "http://127.0.0.1:9"] + (["--results", results] if results else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and "s3://" in err[0]


def test_submit_takes_iwae_results_and_refuses_credentials_in_it(capsys, monkeypatch):
    """IWAE_RESULTS stands for --results in submit too; a location with a key and secret in it is refused before any upload, never echoed."""
    from pipeline.cli import main

    secret = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("IWAE_RESULTS", f"s3://AKIDEXAMPLE:{secret}@bucket/iwae")
    assert main(["submit", "demo", "--address", "http://127.0.0.1:9", "--train-gpus", "0.25"]) == 2
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and "holds credentials" in err[0] and "IAM role" in err[0], err
    assert secret not in out.out + out.err and "AKIDEXAMPLE" not in out.out + out.err
    monkeypatch.setenv("IWAE_RESULTS", "s3://bucket/iwae")  # accepted: the command goes on to the Jobs address (nothing listens there)
    assert main(["submit", "demo", "--address", "http://127.0.0.1:9", "--train-gpus", "0.25"]) == 2
    assert "cannot reach" in capsys.readouterr().err
