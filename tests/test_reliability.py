"""Reliability: real faults (SIGKILL of workers and drivers, NaN trials, partial files, concurrent
commands) with real processes and a real local Ray, and bad input that must fail in one line."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.cli import main
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "iwae-pipeline")


def run_cli(*args, env=None, timeout=600):
    e = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=e, timeout=timeout, cwd=ROOT)


# Fault injection lives with the tests (tests/faults/sitecustomize.py), switched on by these variables
FAULTS = str(ROOT / "tests" / "faults")


def faults(**env):
    return {"PYTHONPATH": FAULTS, **{f"IWAE_TEST_{k.upper()}": str(v) for k, v in env.items()}}


# Ray workers inherit the driver's environment: a tag per test run lets the kill tests pick only
# their own workers, never those of a sweep someone is running beside `make test` on this machine.
TAG = f"iwae-test-{os.getpid()}"


def start_cli(*args, env=None):
    e = {**os.environ, "RAY_AUTH_MODE": "disabled", "IWAE_TEST_TAG": TAG, **(env or {})}
    return subprocess.Popen([CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e, cwd=ROOT, start_new_session=True)


def pids_matching(text):
    """Processes whose command line has ``text`` and whose environment has this run's tag."""
    out = subprocess.run(["pgrep", "-f", text], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid() and _tagged(int(p))]


def _tagged(pid):
    try:
        return f"IWAE_TEST_TAG={TAG}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or not ours to read
        return False


SMOKE = "k100-seed123-block50"  # the smoke jobs' estimate


def assert_each_image_once(results, runs, images, files_too=True):
    """The one reader sees ``images`` images of each run once, in the smoke estimate and its pruned
    twin; with ``files_too``, no image is in two files either (no range was written twice)."""
    from pipeline.store.estimates import read_estimates

    for est in (SMOKE, SMOKE + "-pruned"):
        ev = read_estimates(str(results), estimate=est)
        assert len(ev) == runs * images and set(ev.groupby("run_id").size()) == {images}, (est, len(ev))
        if files_too:
            files = (results / "tables" / "eval").glob(f"run_id=*/estimate={est}/*.parquet")
            raw = pd.concat([pd.read_parquet(p).assign(run_id=p.parent.parent.name) for p in files])
            assert not raw.duplicated(["run_id", "image_id"]).any(), est


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_dir):
    """The smoke demo trained once (no evaluation), copied by the tests that need it."""
    results = tmp_path_factory.mktemp("trained") / "results"
    r = run_cli("sweep", "demo", "--size", "smoke", "--no-eval", "--results", results, "--data-dir", mnist_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    return results


def copy_results(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tune"))
    return dst


@pytest.mark.slow
def test_evaluation_survives_a_killed_worker(trained, tmp_path, mnist_dir):
    """An evaluation worker SIGKILLed mid-range: Ray retries its task elsewhere, every image appears exactly once."""
    results = copy_results(trained, tmp_path / "r")
    proc = start_cli(
        "evaluate",
        "demo",
        "--size",
        "smoke",
        "--results",
        results,
        "--data-dir",
        mnist_dir,
        "--test-images",
        "1000",
        "--eval-workers",
        "2",
        env=faults(slow_score=1),
    )
    assert wait_for(lambda: pids_matching("ray::_call"), timeout=120), "no evaluation task started"
    time.sleep(0.5)
    victim = pids_matching("ray::_call")[0]
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert_each_image_once(results, runs=2, images=1000)


@pytest.mark.slow
def test_killed_sweep_driver_resumes_without_retraining(tmp_path, mnist_dir):
    """SIGKILL the sweep driver (and its local Ray) after a run finished; the same command trains only
    what was unfinished (taking over the dead command's leases once they expire), no row appears twice."""
    results = tmp_path / "r"
    args = ("sweep", "paper_table1", "--size", "smoke", "--no-eval", "--results", results, "--data-dir", mnist_dir)
    proc = start_cli(*args, env={"IWAE_LEASE_SECONDS": "6"})
    runs_dir = results / "tables" / "runs"
    assert wait_for(lambda: runs_dir.exists() and any(runs_dir.glob("*.parquet")), timeout=240), (
        proc.stdout.read() if proc.poll() is not None else "no run finished"
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = {p.name: p.stat().st_mtime_ns for p in runs_dir.glob("*.parquet")}
    assert 1 <= len(done_before) < 5, "kill the driver mid-sweep"
    r = run_cli(*args, env={"IWAE_LEASE_SECONDS": "6"})  # the dead command's leases (6 s here) expire and are taken over
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not (results / "tune").exists()
    runs = pd.read_parquet(runs_dir)
    assert len(runs) == 5 and set(runs.status) == {"done"} and runs.run_id.is_unique
    for name, mtime in done_before.items():  # finished runs were not trained again
        assert (runs_dir / name).stat().st_mtime_ns == mtime
    train = pd.read_parquet(results / "tables" / "train")
    assert not train.duplicated(["run_id", "epoch"]).any() and len(train) == 5 * 4


@pytest.mark.slow
def test_a_diverged_run_is_named_not_retried_and_the_rerun_resumes_from_its_checkpoint(tmp_path, mnist_dir):
    """A run whose losses turn NaN in epoch 3 is a deterministic failure: not retried; the other run
    finishes and is evaluated, the report shows the failed run, and the command exits 1 with one line
    naming it; the same command again resumes it from its epoch-2 checkpoint (the fault fired once),
    finishes and evaluates it."""
    from pipeline.store.estimates import read_estimates

    results = tmp_path / "r"
    env = faults(nan_epoch=2, once_file=tmp_path / "fired")
    args = ("sweep", "demo", "--size", "smoke", "--results", results, "--data-dir", mnist_dir)
    r = run_cli(*args, env=env)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "non-finite in epoch 3" in errors[0] and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert (tmp_path / "fired").exists()
    runs = pd.read_parquet(results / "tables" / "runs")
    assert sorted(runs.status) == ["done", "failed"]
    failed, done = runs[runs.status == "failed"].run_id.iloc[0], runs[runs.status == "done"].run_id.iloc[0]
    assert failed in errors[0]
    ev = read_estimates(str(results), estimate=SMOKE)
    assert set(ev.run_id) == {done} and len(ev) == 20  # the other run is evaluated
    report = (results / "report" / "report.md").read_text()
    assert "1 run(s) failed" in report and failed in report and "| failed" in report
    r = run_cli(*args, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = pd.read_parquet(results / "tables" / "runs")
    assert sorted(runs.resumed_from_epoch) == [0, 2]  # exactly one run resumed, from epoch 2
    train = pd.read_parquet(results / "tables" / "train")
    assert sorted(train.groupby("run_id").epoch.apply(list).map(tuple)) == [(1, 2, 3, 4)] * 2
    assert_each_image_once(results, runs=2, images=20)


@pytest.mark.slow
def test_a_hung_task_lets_its_lease_expire_another_command_takes_the_run_over_and_the_stall_rule_ends_it(tmp_path, mnist_dir):
    """A training task that hangs after its first epoch (it sleeps before the second, so its steps
    stop) renews its leases no more: they expire (6 s here), a second command started meanwhile takes
    the runs over and trains them on from the first's checkpoint of epoch 1, and the first command
    finds its tasks stalled, cancels them and ends in one line, exit 1, without marking the runs
    failed. Each epoch is trained once. (A task that has made no step yet keeps its leases while it
    starts: loading data, compiling.)"""
    results = tmp_path / "r"
    args = ("sweep", "demo", "--size", "smoke", "--no-eval", "--results", results, "--data-dir", mnist_dir)
    short = {"IWAE_LEASE_SECONDS": "6"}
    a = start_cli(*args, env={**faults(slow_epoch=120, slow_from=1), **short})
    assert wait_for(lambda: len(list((results / "runs").rglob("latest.pt"))) >= 2, timeout=120), "the first command's tasks trained no epoch"
    b = start_cli(*args, env=short)
    out_b, _ = b.communicate(timeout=300)
    out_a, _ = a.communicate(timeout=300)
    errors = [ln for ln in out_a.splitlines() if ln.startswith("error:")]
    assert a.returncode == 1 and len(errors) == 1 and "stalled" in errors[0] and "no training step" in errors[0] and "Traceback" not in out_a, out_a[-3000:]
    assert b.returncode == 0, out_b[-3000:]
    runs = pd.read_parquet(results / "tables" / "runs")
    train = pd.read_parquet(results / "tables" / "train")
    assert len(runs) == 2 and set(runs.status) == {"done"} and set(runs.resumed_from_epoch) == {1}
    assert len(train) == 2 * 4 and not train.duplicated(["run_id", "epoch"]).any()
    assert sorted(p.name for p in (results / "leases").rglob("*.json")) == ["000001.json", "000001.json", "000002.json", "000002.json"]


@pytest.mark.slow
def test_trial_that_keeps_failing_is_named_and_reported(tmp_path, mnist_dir):
    """A pack that is NaN on every attempt ends the sweep with exit 1 naming it; the report marks it failed."""
    results = tmp_path / "r"
    r = run_cli(
        "sweep",
        "demo",
        "--size",
        "smoke",
        "--no-eval",
        "--retries",
        "1",
        "--results",
        results,
        "--data-dir",
        mnist_dir,
        env=faults(nan_epoch=0),
    )
    assert r.returncode == 1
    runs = pd.read_parquet(results / "tables" / "runs")
    assert set(runs.status) == {"failed"} and all(rid in r.stderr for rid in runs.run_id)
    assert "non-finite" in runs.error.iloc[0]
    rep = run_cli("report", "--results", results)
    assert rep.returncode == 0 and "2 run(s) failed" in rep.stdout


@pytest.mark.slow
def test_two_sweeps_started_together_train_each_run_once(tmp_path, mnist_dir):
    """Two `sweep` commands of one job on one location at once (a re-submit after a lost connection):
    each run's lease lets one command train it; the other says so, waits, and both end with every
    run done, trained once (one history row per epoch, no run resumed, one lease generation)."""
    results = tmp_path / "r"
    args = ("sweep", "demo", "--size", "smoke", "--no-eval", "--results", results, "--data-dir", mnist_dir)
    slow = faults(slow_epoch=1)  # 4 s of training per run: the two commands overlap
    a, b = start_cli(*args, env=slow), start_cli(*args, env=slow)
    out_a, _ = a.communicate(timeout=300)
    out_b, _ = b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, out_a[-2000:] + out_b[-2000:]
    assert "is being trained by another command" in out_a + out_b, out_a[-2000:] + out_b[-2000:]
    train = pd.read_parquet(results / "tables" / "train")
    runs = pd.read_parquet(results / "tables" / "runs")
    assert len(train) == 2 * 4 and not train.duplicated(["run_id", "epoch"]).any()
    assert len(runs) == 2 and set(runs.resumed_from_epoch) == {0} and set(runs.status) == {"done"}
    assert sorted(p.name for p in (results / "leases").rglob("*.json")) == ["000001.json"] * 2


@pytest.mark.slow
def test_two_evaluations_at_once_do_not_double_rows(trained, tmp_path, mnist_dir):
    """Two `evaluate` commands on the same folder at the same time: exactly one row per image."""
    results = copy_results(trained, tmp_path / "r")
    args = ("evaluate", "demo", "--size", "smoke", "--results", results, "--data-dir", mnist_dir, "--test-images", "1000")
    a, b = start_cli(*args), start_cli(*args)
    out_a, _ = a.communicate(timeout=300)
    out_b, _ = b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, out_a[-2000:] + out_b[-2000:]
    assert_each_image_once(results, runs=2, images=1000, files_too=False)  # both may write a range: the same rows


@pytest.mark.slow
def test_two_evaluations_of_other_sizes_at_once_both_finish_and_count_each_image_once(trained, tmp_path, mnist_dir):
    """`evaluate --test-images 20` and `--test-images 1000` on one folder at the same time, both slowed
    so that they overlap: there is no layout to conflict over, so both exit 0; the one reader counts
    each of the 1,000 images once, whichever ranges both wrote."""
    results = copy_results(trained, tmp_path / "r")
    args = ("evaluate", "demo", "--size", "smoke", "--results", results, "--data-dir", mnist_dir)
    slow = faults(slow_score=1)  # both survey (nothing there yet) before either writes
    a, b = start_cli(*args, "--test-images", "20", env=slow), start_cli(*args, "--test-images", "1000", env=slow)
    out_a, _ = a.communicate(timeout=300)
    out_b, _ = b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, out_a[-2000:] + out_b[-2000:]
    assert_each_image_once(results, runs=2, images=1000, files_too=False)


@pytest.mark.slow
def test_partial_files_are_never_read_and_truncated_checkpoints_are_redone(trained, tmp_path, mnist_dir):
    """A leftover `_tmp-*` Parquet is ignored by readers; a truncated final checkpoint is named in one line
    where it is read (the run is done by name), `repair` moves it aside, and the sweep retrains it."""
    results = copy_results(trained, tmp_path / "r")
    run_id = sorted(p.name for p in (results / "runs").iterdir())[0]
    (results / "tables" / "train" / "_tmp-deadbeef.parquet").write_bytes(b"PAR1 half a file")
    assert len(pd.read_parquet(results / "tables" / "train")) == 2 * 4
    final = results / "runs" / run_id / "final.pt"
    final.write_bytes(final.read_bytes()[:1000])
    r = run_cli("evaluate", "demo", "--size", "smoke", "--results", results, "--data-dir", mnist_dir)  # done by name; found where it is read
    assert r.returncode == 2 and "damaged" in r.stderr and "iwae-pipeline repair" in r.stderr and _lines(r.stderr) == 1, r.stderr
    r = run_cli("repair", "--results", results)
    assert r.returncode == 0 and "moved" in r.stderr + r.stdout, r.stdout + r.stderr
    r = run_cli("sweep", "demo", "--size", "smoke", "--results", results, "--data-dir", mnist_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    torch.load(final, weights_only=True)  # rewritten, readable
    assert_each_image_once(results, runs=2, images=20)


# ----------------------------------------------------------------------------------- bad input


def _lines(err: str) -> int:
    """The lines of a command's stderr that are ours (not Ray's own log lines, which start with a date; not a progress bar)."""
    return len([ln for ln in err.splitlines() if ln.strip() and not ln.startswith("20") and "it/s]" not in ln and "range/s]" not in ln])


def one_line_error(capsys, argv, match, code=2):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == code, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("20")]  # Ray's own log lines start with a date
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err
    return lines[0]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["sweep", "nojob"], "unknown job"),
        (["train", "--k", "0"], "--k"),
        (["train", "--batch-size", "0"], "--batch-size"),
        (["sweep", "demo", "--train-gpus", "-1"], "--train-gpus"),
        (["train", "--objective", "elbo9"], "--objective"),
        (["sweep", "demo", "--stages", "9"], "--stages"),
        (["sweep", "demo", "--where", "colour=red"], "--where"),
        (["sweep", "demo", "--where", "k=7"], "keeps none"),
    ],
)
def test_out_of_range_options_fail_in_one_line(capsys, tmp_path, argv, match):
    """Unknown jobs and out-of-range options: exit 2, one line, nothing written."""
    one_line_error(capsys, [*argv, "--results", tmp_path / "r"] if argv[0] == "sweep" else argv, match)
    assert not (tmp_path / "r").exists()


def test_missing_data_file(capsys, tmp_path):
    """No MNIST in the data folder: one line that says to run `data fetch`."""
    one_line_error(capsys, ["train", "--data-dir", tmp_path / "empty", "--results", tmp_path / "r", "--stages", "1"], "iwae-pipeline data fetch mnist")


def test_tampered_data_file(capsys, tmp_path):
    """A data file whose checksum does not match is refused, and nothing is cached."""
    bad = tmp_path / "mnist.pkl.gz"
    bad.write_bytes(b"\x1f\x8b not the real pickle")
    one_line_error(capsys, ["data", "fetch", "mnist", "--data-dir", tmp_path / "d", "--source", bad], "sha256")
    assert not (tmp_path / "d" / "mnist.npz").exists()


def test_results_folder_with_foreign_files(capsys, tmp_path):
    """A results folder that holds someone else's files is refused (their files would be read as data)."""
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    one_line_error(capsys, ["train", "--results", tmp_path / "r", "--stages", "1"], "not written by iwae-pipeline")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["notes.txt"]


def test_foreign_file_inside_the_tables(capsys, trained, tmp_path):
    """A stray file inside tables/ is named rather than read as a result."""
    results = copy_results(trained, tmp_path / "r")
    (results / "tables" / "eval").mkdir(parents=True, exist_ok=True)
    (results / "tables" / "eval" / "extra.csv").write_text("a,b\n")
    one_line_error(capsys, ["report", "--results", results], "extra.csv")


def test_foreign_checkpoint(capsys, trained, tmp_path, mnist_dir):
    """A checkpoint that is not ours (or holds code) is refused in one line where it is read, exit 2."""
    results = copy_results(trained, tmp_path / "r")
    run_id = sorted(p.name for p in (results / "runs").iterdir())[0]
    torch.save({"weights": torch.zeros(3)}, results / "runs" / run_id / "final.pt")
    r = run_cli("evaluate", "demo", "--size", "smoke", "--results", results, "--data-dir", mnist_dir)
    assert r.returncode == 2 and "not an iwae-pipeline checkpoint" in r.stderr and _lines(r.stderr) == 1, r.stderr


def test_unreachable_address(capsys, tmp_path):
    """An --address where nothing listens fails in seconds with exit 2."""
    t0 = time.monotonic()
    one_line_error(capsys, ["sweep", "demo", "--size", "smoke", "--address", "127.0.0.1:9", "--results", tmp_path / "r"], "cannot reach")
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_gpu_request_the_cluster_cannot_meet(capsys, ray_local, tmp_path, mnist_dir):
    """Asking for a GPU on a CPU-only cluster fails at once (Ray would wait forever)."""
    t0 = time.monotonic()
    one_line_error(capsys, ["sweep", "demo", "--size", "smoke", "--train-gpus", "1", "--results", tmp_path / "r", "--data-dir", mnist_dir], "GPU")
    assert time.monotonic() - t0 < 60


# ----------------------------------------------------------------------------------- evaluation that finishes


@pytest.mark.slow
def test_range_out_of_retries_exits_1_in_one_line_and_the_rerun_completes(trained, tmp_path, mnist_dir):
    """A range whose worker is killed more often than --retries: exit 1, one line naming run and images,
    no traceback, the other ranges kept; the same command again completes with exact rows."""
    results = copy_results(trained, tmp_path / "r")
    args = ("evaluate", "demo", "--size", "smoke", "--results", results, "--data-dir", mnist_dir, "--test-images", "1000", "--eval-workers", "1")
    proc = start_cli(*args, "--retries", "0", env=faults(slow_score=1))
    assert wait_for(lambda: pids_matching("ray::_call"), timeout=120), "no evaluation task started"
    time.sleep(0.5)
    t_fault = time.monotonic()
    os.kill(pids_matching("ray::_call")[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    print(f"out of retries: exit {proc.returncode} {time.monotonic() - t_fault:.1f} s after the kill")
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert re.search(r"run [0-9a-f]{12} images \d+-\d+", errors[0]), errors[0]
    from pipeline.store.estimates import read_estimates

    assert len(read_estimates(str(results), estimate=SMOKE)) < 2 * 1000
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_each_image_once(results, runs=2, images=1000)


@pytest.mark.slow
def test_damaged_ranges_are_moved_aside_and_redone(trained, tmp_path, mnist_dir):
    """What is written is known by name; contents are checked where they are read. A zero-byte range
    file is seen in the listing: moved to _quarantine (kept), named in one line, and redone by the
    next evaluation. A truncated one and one holding another evaluation's rows (the pruned twin's)
    count by their names until read: the report names the truncated one in one line with the fix,
    `repair` reads every file and moves both aside, and the next evaluation redoes them: exact rows."""
    results = copy_results(trained, tmp_path / "r")
    args = ("evaluate", "demo", "--size", "smoke", "--results", results, "--data-dir", mnist_dir, "--test-images", "1500")
    assert run_cli(*args).returncode == 0
    files = sorted((results / "tables" / "eval").glob(f"*/estimate={SMOKE}/images-*.parquet"))
    a = [p for p in files if p.parts[-3] == files[0].parts[-3]]
    a[0].write_bytes(a[0].read_bytes()[: a[0].stat().st_size // 2])  # truncated
    a[1].write_bytes(b"")  # zero bytes
    twin = a[2].parents[1] / f"estimate={SMOKE}-pruned" / a[2].name
    a[2].write_bytes(twin.read_bytes())  # the pruned model's rows: another evaluation's settings
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    moved = [ln for ln in r.stderr.splitlines() if "moved to" in ln]
    assert len(moved) == 1 and str(a[1]) in moved[0] and "is empty" in moved[0], r.stderr[-3000:]
    r = run_cli("report", "--results", results)
    assert r.returncode == 2 and _lines(r.stderr) == 1 and str(a[0]) in r.stderr and "iwae-pipeline repair" in r.stderr, r.stderr[-2000:]
    r = run_cli("repair", "--results", results)
    moved = [ln for ln in r.stderr.splitlines() if "moved to" in ln]
    assert r.returncode == 0 and len(moved) == 2 and "another evaluation" in " ".join(moved), r.stdout + r.stderr
    assert len(list((results / "_quarantine").rglob("images-*"))) == 3
    assert run_cli(*args).returncode == 0
    assert_each_image_once(results, runs=2, images=1500)


def test_report_names_the_file_it_cannot_read(capsys, trained, tmp_path):
    """A damaged table file: `report` exits 2 with one line naming that exact file."""
    results = copy_results(trained, tmp_path / "r")
    victim = sorted((results / "tables" / "train").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:40])
    line = one_line_error(capsys, ["report", "--results", results], "not a valid train table")
    assert str(victim) in line


def test_connecting_to_an_address_that_never_answers_fails_within_the_deadline(tmp_path):
    """A port that accepts connections and never speaks (ray.init would wait for minutes): exit 2, one line, within the bound."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    held = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.5)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # keep it open, say nothing
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    t0 = time.monotonic()
    r = run_cli(
        "sweep", "demo", "--size", "smoke", "--address", f"127.0.0.1:{port}", "--results", tmp_path / "r", env={"IWAE_CONNECT_TIMEOUT": "5"}, timeout=120
    )
    took = time.monotonic() - t0
    stop.set()
    server.close()
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    print(f"silent address: exit {r.returncode} after {took:.1f} s")
    assert r.returncode == 2 and len(errors) == 1 and "no answer" in errors[0] and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert took < 60


# ----------------------------------------------------------------------------------- a newcomer's mistakes


def test_empty_data_dir_fails_before_any_work(capsys, tmp_path):
    """sweep with a --data-dir that has no MNIST: exit 2, one line with the fetch command for that folder, no results folder made."""
    line = one_line_error(capsys, ["sweep", "demo", "--size", "smoke", "--data-dir", tmp_path / "empty", "--results", tmp_path / "r"], "data fetch mnist")
    assert f"--data-dir {tmp_path / 'empty'}" in line
    assert not (tmp_path / "r").exists()


def test_hints_repeat_the_users_own_options(capsys, tmp_path, mnist_dir):
    """A job that needs another job first: the suggested command keeps --size, --results and --data-dir as given."""
    line = one_line_error(
        capsys, ["sweep", "paper_table2", "--size", "smoke", "--results", tmp_path / "r", "--data-dir", mnist_dir], "iwae-pipeline sweep paper_table1"
    )
    assert "--size smoke" in line and f"--results {tmp_path / 'r'}" in line and f"--data-dir {mnist_dir}" in line


def test_evaluate_without_the_cut_names_the_cut_the_location_holds(capsys, tmp_path):
    """The README's `sweep paper_table1 --stages 3`, then `evaluate paper_table1` without --stages: run
    ids depend on the cut, so the one line names --stages 3 (what the location holds) instead of
    suggesting a sweep of the 3,280-epoch schedule as the only way on."""
    import jobs
    from pipeline.store.results import Results
    from tests.fakes import add_run

    res = Results.open(str(tmp_path / "r"))
    for cfg in jobs.build("paper_table1", stages=3).runs[:4]:
        add_run(res, cfg)
    line = one_line_error(capsys, ["evaluate", "paper_table1", "--results", tmp_path / "r"], "trained with --stages 3")
    assert "pass --stages 3 to evaluate those" in line, line


def test_report_on_an_empty_results_folder_exits_2_with_the_command_that_fills_it(capsys, tmp_path):
    """An empty (but ours) results folder has nothing to report: exit 2 and the sweep that fills it."""
    from pipeline.store.results import Results

    Results.open(tmp_path / "r")
    line = one_line_error(capsys, ["report", "--results", tmp_path / "r"], "iwae-pipeline sweep demo")
    assert f"--results {tmp_path / 'r'}" in line


def test_a_swallowed_ctrl_c_is_raised_again_when_the_guarded_loop_ends():
    """A KeyboardInterrupt that some frame swallows (as a finaliser does) is not lost: the guard
    remembers the SIGINT and raises again on the way out; the previous handler comes back."""
    from pipeline.ray_backend.adapter import probe
    from pipeline.ray_backend.cluster import Cluster

    cluster = Cluster("127.0.0.1:6379", owned=False, capabilities=probe())
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with cluster.interrupt_guard():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the handler runs here and raises
                pytest.fail("SIGINT did not interrupt")
            except KeyboardInterrupt:
                pass  # swallowed
            assert cluster.interrupted.is_set()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_ctrl_c_during_a_sweep_keeps_what_is_done_and_says_to_rerun(tmp_path, mnist_dir):
    """SIGINT mid-sweep: exit 130 with the one 'interrupted ... run the same command again' line, no Tune advice,
    no run marked failed; the same command then finishes."""
    results = tmp_path / "r"
    args = ("sweep", "demo", "--size", "smoke", "--no-eval", "--results", results, "--data-dir", mnist_dir)
    proc = start_cli(*args, env=faults(slow_epoch=2))
    assert wait_for(lambda: any((results / "runs").rglob("latest.pt")) if (results / "runs").exists() else False, timeout=180)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out and "run the same command again" in out and "Tuner.restore" not in out and "failed" not in out, out[-3000:]
    runs = results / "tables" / "runs"
    assert not runs.exists() or set(pd.read_parquet(runs).status) <= {"done"}
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(pd.read_parquet(runs).status) == {"done"}


@pytest.mark.slow
def test_a_task_whose_compile_fails_says_so_on_the_driver_and_in_its_run_row(tmp_path, mnist_dir):
    """torch.compile fails inside a training task (a worker's warnings reach no console of their own):
    the driver prints one line naming the run, the run trains eagerly to the end, and its row says
    its step was not compiled (nor graphed: no GPU here)."""
    results = tmp_path / "r"
    args = ("sweep", "demo", "--size", "smoke", "--no-eval", "--compile", "on", "--where", "objective=iwae", "--results", results, "--data-dir", mnist_dir)
    r = run_cli(*args, env=faults(compile_fail=1))
    assert r.returncode == 0, r.stderr[-3000:]
    said = [ln for ln in r.stderr.splitlines() if "torch.compile failed" in ln]
    runs = pd.read_parquet(results / "tables" / "runs")
    assert len(said) == 1 and runs.run_id.iloc[0] in said[0] and "training eagerly" in said[0], r.stderr[-2000:]
    assert runs.status.tolist() == ["done"] and runs.step_compiled.tolist() == [False] and runs.step_graphed.tolist() == [False]
