"""On a real multi-node Ray cluster with no shared disk, against a real S3 server (all on loopback):
results and checkpoints in object storage, a lost node during training and during evaluation, and
a local results folder that the nodes cannot see. See tests/cluster/fixture.py for the set-up."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.cluster.fixture import CREDENTIALS, FaultyProxy, LocalCluster, S3Server, private_mounts
from tests.helpers import wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "iwae-pipeline")


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if why := private_mounts():
        pytest.skip(f"the multi-node tests {why}")
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), workers=2)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def s3_data(s3, mnist_dir):
    """MNIST in the bucket: every worker node copies it into its own private cache."""
    s3.put("data/mnist.npz", (mnist_dir / "mnist.npz").read_bytes())
    return s3.uri("data")


@pytest.fixture(autouse=True)
def _two_workers(cluster):
    cluster.set_faults()
    while len(cluster.workers) < 2:
        cluster.add_worker()
    yield
    cluster.set_faults()


def driver_dir(cluster, name):
    d = cluster.tmp / name
    d.mkdir(exist_ok=True)
    return d


def cli(cluster, *args, cwd, timeout=600, env=None):
    """The CLI as a user runs it: its own process, the cluster's address, no Ray settings of ours."""
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ENABLE", "IWAE_TEST"))}
    env.update(CREDENTIALS, RAY_AUTH_MODE="disabled", **extra)
    return subprocess.run([CLI, *map(str, args), "--address", cluster.address], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def start(cluster, *args, cwd, env=None):
    """The CLI in the background; its output goes to a file (a pipe nobody reads until the end would
    block a chatty command), read back by :func:`output`."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ENABLE", "IWAE_TEST"))}
    e.update(CREDENTIALS, RAY_AUTH_MODE="disabled", **(env or {}))
    log = open(Path(cwd) / f"cli-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115  # closed by output()
    proc = subprocess.Popen([CLI, *map(str, args), "--address", cluster.address], stdout=log, stderr=subprocess.STDOUT, text=True, env=e, cwd=cwd)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def output(proc, timeout=300):
    """Wait for a background CLI and return its output."""
    proc.wait(timeout=timeout)
    proc.log.seek(0)
    out = proc.log.read()
    proc.log.close()
    return out


def started(proc, s3, prefix, timeout=180):
    """The evaluation's first range is in the bucket; if the command ended first, its output says why."""
    ok = wait_for(lambda: len(s3.keys(f"{prefix}/tables/eval")) >= 1 or proc.poll() is not None, timeout=timeout)
    if not ok or proc.poll() is not None:
        proc.log.seek(0)
        pytest.fail(f"evaluation did not start (exit {proc.poll()}): {proc.log.read()[-3000:]}")


SMOKE = "k100-seed123-block50"  # the smoke jobs' estimate


def read_estimate(s3, prefix, estimate=SMOKE):
    """One estimate of the run in the bucket through the one reader (each image once)."""
    from pipeline.store.estimates import read_estimates

    return read_estimates(s3.uri(prefix), estimate=estimate)


def raw_rows(s3, prefix, estimate=SMOKE):
    """Every row of one estimate's files in the bucket, duplicates included, with the run of each
    file's folder (``run_id=<id>/estimate=<name>/``)."""
    import pandas as pd

    keys = [k for k in s3.keys(f"{prefix}/tables/eval") if f"/estimate={estimate}/" in k and k.endswith(".parquet")]
    fs = s3.fs()
    return pd.concat([pq.read_table(k, filesystem=fs).to_pandas().assign(run_id=k.split("/run_id=")[1].split("/")[0]) for k in keys], ignore_index=True)


def read_table(s3, prefix, name):
    import pyarrow as pa

    keys = [k for k in s3.keys(f"{prefix}/tables/{name}") if k.endswith(".parquet") and "/_" not in k]
    fs = s3.fs()
    return pa.concat_tables([pq.read_table(k, filesystem=fs) for k in keys]).to_pandas() if keys else None


@pytest.fixture(scope="module")
def smoke_on_s3(cluster, s3, s3_data):
    """The smoke demo swept (train + evaluate) on the cluster into S3, once for the module."""
    cwd = driver_dir(cluster, "smoke-driver")
    t0 = time.monotonic()
    r = cli(cluster, "sweep", "demo", "--size", "smoke", "--results", s3.uri("smoke"), "--data-dir", s3_data, cwd=cwd)
    seconds = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"multi-node smoke sweep on S3: {seconds:.1f} s")
    return {"prefix": "smoke", "cwd": cwd, "sweep": r, "seconds": seconds}


def test_smoke_sweep_evaluate_report_on_s3(cluster, s3, s3_data, smoke_on_s3):
    """sweep, evaluate and report with --results s3://... on 3 nodes: exact rows in the bucket, nothing on local disk."""
    runs = read_table(s3, "smoke", "runs")
    assert len(runs) == 2 and set(runs.status) == {"done"} and runs.run_id.is_unique
    ev = raw_rows(s3, "smoke")
    assert len(ev) == 2 * 20 and not ev.duplicated(["run_id", "image_id"]).any() and len(raw_rows(s3, "smoke", SMOKE + "-pruned")) == 40
    assert ev[["ess", "khat", "mcse", "log_px_jk"]].notna().all().all()
    keys = s3.keys("smoke")
    assert sum(k.endswith("/final.pt") for k in keys) == 2
    assert not any("/tune/" in k for k in keys)  # no experiment state in the bucket: runs resume from their own checkpoints
    r = cli(cluster, "evaluate", "demo", "--size", "smoke", "--results", s3.uri("smoke"), "--data-dir", s3_data, cwd=smoke_on_s3["cwd"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(raw_rows(s3, "smoke")) == 40  # nothing redone, nothing doubled
    rep = subprocess.run(
        [CLI, "report", "--results", s3.uri("smoke")], capture_output=True, text=True, env={**os.environ, **CREDENTIALS}, cwd=smoke_on_s3["cwd"]
    )
    assert rep.returncode == 0 and "Table 1" in rep.stdout, rep.stderr[-2000:]
    assert f"{s3.bucket}/smoke/report/report.md" in s3.keys("smoke/report")
    # nothing went to a local results folder: the driver's working folder holds nothing at all
    assert list(smoke_on_s3["cwd"].iterdir()) == []


def test_storage_faults_the_clients_do_not_absorb_never_end_a_sweep_or_an_evaluation(cluster, s3, s3_data, smoke_on_s3):
    """Behind a proxy that answers 10% of requests with 503 SlowDown or a dropped connection and fails
    5% of keys five times in a row, more than the driver's clients try (3 here: IWAE_S3_CLIENT_ATTEMPTS;
    the streak would have to outlast 10 by default), a sweep and an evaluation on the 3-node cluster
    end with exit 0: every run trained once (one lease generation, one history row per epoch), every
    image scored once, with the numbers of the fault-free sweep."""
    proxy = FaultyProxy(s3, rate=0.10, sticky=0.05, streak=5, seed=1)
    cwd = driver_dir(cluster, "faults-driver")
    env = {"IWAE_S3_CLIENT_ATTEMPTS": "3"}  # the driver's clients give up sooner, so the store's own retries have to carry it
    faulty = ["--results", proxy.uri("faults"), "--data-dir", s3_data]
    try:
        r = cli(cluster, "sweep", "demo", "--size", "smoke", *faulty, cwd=cwd, timeout=900, env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        r = cli(cluster, "evaluate", "demo", "--size", "smoke", "--test-images", 40, *faulty, cwd=cwd, timeout=900, env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    finally:
        proxy.stop()
    assert proxy.faults["sticky"] > 0 and proxy.faults["503"] + proxy.faults["drop"] >= 10, proxy.faults
    runs, train = read_table(s3, "faults", "runs"), read_table(s3, "faults", "train")
    assert len(runs) == 2 and set(runs.status) == {"done"} and len(train) == 2 * 4 and not train.duplicated(["run_id", "epoch"]).any()
    history = train.groupby("run_id").epoch.apply(sorted).tolist()
    assert history == [[1, 2, 3, 4]] * 2  # trained once: no epoch twice (a unit retried after the store failed resumes from its checkpoint)
    raw = raw_rows(s3, "faults")
    assert len(raw) == 2 * 40 and not raw.duplicated(["run_id", "image_id"]).any()
    clean = read_estimate(s3, "smoke").set_index(["run_id", "image_id"]).log_px.astype(float)
    faulty_rows = read_estimate(s3, "faults").set_index(["run_id", "image_id"]).log_px.astype(float)
    assert len(clean) == 40 and (faulty_rows.reindex(clean.index) - clean).abs().max() < 1e-9
    bounds = read_table(s3, "smoke", "runs").set_index("run_id").final_train_bound
    assert (runs.set_index("run_id").final_train_bound.reindex(bounds.index) - bounds).abs().max() < 1e-9


def test_a_refusing_store_is_one_line_exit_2_and_a_failing_one_is_named_failing(cluster, s3, s3_data):
    """Access denied on every request: one line naming credentials, exit 2. A store that keeps
    failing (every request 503) past the retry bound: one line saying it is failing, exit 1, never
    read as missing credentials."""
    proxy = FaultyProxy(s3)
    cwd = driver_dir(cluster, "refused-driver")
    try:
        proxy.mode = "403"
        r = cli(cluster, "sweep", "demo", "--size", "smoke", "--results", proxy.uri("denied"), "--data-dir", s3_data, cwd=cwd)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "refuses" in lines[0] and "credentials" in lines[0], r.stderr[-2000:]
        proxy.mode = "down"
        down = {"IWAE_STORE_RETRY_SECONDS": "5", "IWAE_S3_CLIENT_ATTEMPTS": "2"}
        r = cli(cluster, "sweep", "demo", "--size", "smoke", "--results", proxy.uri("down"), "--data-dir", s3_data, cwd=cwd, env=down)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 1 and len(lines) == 1 and "kept failing" in lines[0] and "credentials" not in lines[0], r.stderr[-2000:]
    finally:
        proxy.stop()


def test_readme_pandas_snippet_reads_results_from_s3(s3, smoke_on_s3):
    """The README's pandas snippet, run as written but for the bucket and the endpoint of this S3 server."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- s3-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost its S3 pandas snippet"
    code = m.group(1).replace('"s3://my-bucket/iwae"', repr(s3.uri("smoke")))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    ev = scope["ev"]
    assert len(ev[ev.estimate == SMOKE]) == 40 and {"log_px", "khat", "ess"} <= set(ev.columns) and len(scope["runs"]) == 2


def test_lost_node_mid_training_resumes_on_the_other_from_its_last_epoch(cluster, s3, s3_data):
    """A worker node killed mid-training: its pack's task resumes on the other node from its last checkpoint in S3."""
    prefix = "lost-train"
    cluster.set_faults(slow_epoch=2.0)  # 4 epochs of 2 s each: a window to lose a node mid-trial
    proc = start(cluster, "sweep", "demo", "--size", "smoke", "--no-eval", "--retries", "3", "--results", s3.uri(prefix), "--data-dir", s3_data,
                 cwd=driver_dir(cluster, "lost-train"))  # fmt: skip
    assert wait_for(lambda: sum(k.endswith("/latest.pt") for k in s3.keys(f"{prefix}/runs")) == 2, timeout=240), "no run checkpointed"
    t_fault = time.monotonic()
    cluster.kill_worker(0)
    out = output(proc, 600)
    print(f"lost node mid-training: exit {proc.returncode} {time.monotonic() - t_fault:.1f} s after the fault")
    assert proc.returncode == 0, out[-4000:]
    runs = read_table(s3, prefix, "runs")
    assert len(runs) == 2 and set(runs.status) == {"done"}
    assert runs.resumed_from_epoch.max() > 0, runs[["run_id", "resumed_from_epoch"]]
    train = read_table(s3, prefix, "train")
    assert len(train) == 2 * 4 and not train.duplicated(["run_id", "epoch"]).any()


def test_lost_node_mid_evaluation_every_image_once(cluster, s3, s3_data, smoke_on_s3):
    """A worker node killed mid-evaluation: its ranges run again on the node left; exit 0 on its own, each image once."""
    prefix = "lost-eval"
    cwd = driver_dir(cluster, "lost-eval")
    r = cli(cluster, "sweep", "demo", "--size", "smoke", "--no-eval", "--results", s3.uri(prefix), "--data-dir", s3_data, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    cluster.set_faults(slow_score=2.0)
    proc = start(cluster, "evaluate", "demo", "--size", "smoke", "--test-images", "1000", "--results", s3.uri(prefix), "--data-dir", s3_data, cwd=cwd)
    started(proc, s3, prefix)
    t_fault = time.monotonic()
    cluster.kill_worker(0)
    out = output(proc)
    print(f"lost node mid-evaluation: exit {proc.returncode} {time.monotonic() - t_fault:.1f} s after the fault")
    assert proc.returncode == 0, out[-4000:]
    assert "lost 1 node" in out
    ev = raw_rows(s3, prefix)
    assert len(ev) == 2 * 1000 and not ev.duplicated(["run_id", "image_id"]).any()


def test_training_no_node_can_run_stops_in_one_line_and_keeps_its_checkpoints(cluster, s3, s3_data):
    """Every node that can run a training pack is lost mid-training and no node type can replace one:
    the stall rule ends the sweep within its timeout (5 s here), exit 1, one line; the checkpoints
    written so far stay in the bucket, and the same command resumes from them once nodes are back.
    (The endpoint in this test's URI is in the other form pyarrow takes: http://HOST:PORT.)"""
    prefix = "stall-train"
    uri = s3.uri(prefix, form="url")
    cwd = driver_dir(cluster, prefix)
    cluster.set_faults(slow_epoch=2.0)
    proc = start(cluster, "sweep", "demo", "--size", "smoke", "--no-eval", "--results", uri, "--data-dir", s3_data, cwd=cwd, env={"IWAE_STALL_TIMEOUT": "5"})
    assert wait_for(lambda: sum(k.endswith("/latest.pt") for k in s3.keys(f"{prefix}/runs")) >= 1, timeout=240), "no run checkpointed"
    t_fault = time.monotonic()
    while cluster.workers:
        cluster.kill_worker(0)
    out = output(proc, 300)
    seconds = time.monotonic() - t_fault
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "training stalled" in errors[0] and "Traceback" not in out, out[-3000:]
    assert seconds < 120, seconds  # the stall timeout (5 s) after Ray declares the nodes dead, not forever
    kept = [k for k in s3.keys(f"{prefix}/runs") if k.endswith(".pt")]
    assert kept, "checkpoints kept"
    cluster.set_faults()
    cluster.add_worker()
    r = cli(cluster, "sweep", "demo", "--size", "smoke", "--no-eval", "--results", uri, "--data-dir", s3_data, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_table(s3, prefix, "runs").resumed_from_epoch.max() > 0


def test_local_results_the_nodes_cannot_see_fail_in_one_line(cluster, s3_data):
    """--results on the driver's local disk, which no worker node sees: exit 2, one line naming the fix, nothing written."""
    local = cluster.private / "results"
    r = cli(cluster, "sweep", "demo", "--size", "smoke", "--results", local, "--data-dir", s3_data, cwd=driver_dir(cluster, "local-driver"), timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--results s3://" in lines[0], r.stderr[-3000:]
    assert not local.exists()


def test_a_node_joining_mid_evaluation_with_a_stale_cache_rebuilds_it_and_scores(cluster, s3, s3_data, mnist_dir):
    """A worker node joins while an evaluation runs on the one node left, holding an MNIST cache from
    before the pixel fix (v/256, no format version): the command says it joined, the node rebuilds its
    cache from --data-dir and scores ranges, and every image is scored once. The node's cache is read
    back through its own mount namespace: still stale means it never loaded the data."""
    import hashlib

    import numpy as np

    from iwae import data as D

    prefix = "join-eval"
    cwd = driver_dir(cluster, prefix)
    r = cli(cluster, "sweep", "demo", "--size", "smoke", "--no-eval", "--results", s3.uri(prefix), "--data-dir", s3_data, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    cluster.kill_worker(0)  # one node left to start the evaluation on
    stale = cluster.tmp / "stale-mnist.npz"
    D.atomic_save_npz(stale, {k: np.full((2, 784), 255 / 256, np.float32) for k in ("x_train", "x_valid", "x_test")})
    cached = Path("cache") / hashlib.sha256(s3_data.encode()).hexdigest()[:12] / D.MNIST_NPZ  # under IWAE_CACHE_DIR, in the node's private folder
    cluster.set_faults(slow_score=2.0)
    proc = start(cluster, "evaluate", "demo", "--size", "smoke", "--test-images", "1000", "--results", s3.uri(prefix), "--data-dir", s3_data, cwd=cwd)
    started(proc, s3, prefix)
    cluster.add_worker(setup=f"mkdir -p {cached.parent} && cp {stale} {cached}")
    node = cluster.workers[-1]
    out = output(proc)
    assert proc.returncode == 0, out[-4000:]
    assert "1 node(s) joined" in out, out[-3000:]
    ev = raw_rows(s3, prefix)
    assert len(ev) == 2 * 1000 and not ev.duplicated(["run_id", "image_id"]).any()
    seen = Path(f"/proc/{node.pid}/root") / cluster.private.relative_to("/") / cached
    assert seen.read_bytes() == (mnist_dir / "mnist.npz").read_bytes(), "the joined node kept its stale cache (or never scored a range)"


USER_VAE = '''
"""A researcher's VAE, outside the project: its weights in a file beside it."""
from pathlib import Path

import torch
from torch.distributions import Bernoulli, Independent

from iwae.adapter import DistributionModel, gaussian_encoder

enc, dec = torch.nn.Linear(784, 8), torch.nn.Linear(4, 784)


def make_model():
    state = torch.load(Path(__file__).with_name("weights.pt"))
    enc.load_state_dict(state["enc"]), dec.load_state_dict(state["dec"])
    m = DistributionModel(gaussian_encoder(lambda x: enc(x).chunk(2, -1)), lambda h: Independent(Bernoulli(logits=dec(h)), 1), 4)
    m.enc, m.dec = enc, dec
    return m
'''


def test_a_user_model_outside_the_project_is_scored_on_the_cluster(cluster, s3, s3_data):
    """A user's module and its weights in a folder that no worker node can see (each mounts its own
    empty tmpfs there): `score` ships the folder through Ray's runtime environment, the nodes import
    it from there, every test image is scored once into S3, nothing lands on local disk, and a re-run
    scores nothing. Files that look like secrets beside the model (``.env.local``, ``client_secret.json``,
    ``id_ed25519``) stay behind, in one line: the working directory Ray unpacked on the worker nodes
    has the module and its weights (which the folder's ``.gitignore`` names) and none of them."""
    import glob

    import torch

    folder = cluster.private / "user-model"  # the driver sees it; the worker nodes see an empty folder of their own
    folder.mkdir()
    (folder / "user_vae.py").write_text(USER_VAE)
    torch.manual_seed(5)
    torch.save({"enc": torch.nn.Linear(784, 8).state_dict(), "dec": torch.nn.Linear(4, 784).state_dict()}, folder / "weights.pt")
    secrets = [".env.local", "client_secret.json", "id_ed25519"]
    for f in secrets:
        (folder / f).write_text("not to be shipped\n")
    (folder / ".gitignore").write_text("*.pt\n")  # weights a .gitignore names still travel: the factory loads them
    cwd = driver_dir(cluster, "score-driver")
    args = ["score", f"{folder}/user_vae.py:make_model", "--name", "theirs", "--test-images", 600, "--eval-k", 20]
    r = cli(cluster, *args, "--results", s3.uri("scored"), "--data-dir", s3_data, cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "600 scored now" in r.stdout, r.stdout
    said = [ln for ln in r.stderr.splitlines() if "look like secrets" in ln]
    assert len(said) == 1 and all(f in said[0] for f in secrets), r.stderr[-2000:]
    shipped = [Path(p).parent for p in glob.glob("/tmp/ray/session_*/runtime_resources/working_dir_files/*/user_vae.py")]  # unpacked by the nodes
    assert shipped and all((d / "weights.pt").exists() for d in shipped), shipped
    assert not [d / f for d in shipped for f in secrets if (d / f).exists()], "a secret reached a worker node"
    rows = read_estimate(s3, "scored", "k20-seed123-block500")
    assert len(rows) == 600 and sorted(rows.image_id) == list(range(600)) and rows.run_id.nunique() == 1
    assert rows.run_id.iloc[0].startswith("theirs-") and rows.log_px.notna().all()
    assert len(raw_rows(s3, "scored", "k20-seed123-block500")) == 600  # each image once in the files too
    assert list(cwd.iterdir()) == []  # nothing local
    r = cli(cluster, *args, "--results", s3.uri("scored"), "--data-dir", s3_data, cwd=cwd)
    assert r.returncode == 0 and "0 scored now" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
