"""The storage layer (pipeline.store.objects) on a local folder and on file:// URIs; per-node data caches."""

import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.store.objects import Store, is_uri


def test_local_writes_are_whole_and_readers_skip_temporary_names(tmp_path):
    """A write leaves exactly the final file; names starting with _ or . are never listed."""
    s = Store.open(tmp_path / "r")
    s.write_bytes("tables/a/x.parquet", b"1")
    s.write_bytes("tables/a/_tmp-half.parquet", b"partial")
    s.write_bytes("tables/.hidden/y.parquet", b"2")
    assert s.list("tables", ".parquet") == ["tables/a/x.parquet"]
    assert sorted(p.name for p in (tmp_path / "r" / "tables" / "a").iterdir()) == ["_tmp-half.parquet", "x.parquet"]
    s.write_bytes("tables/a/x.parquet", b"3")  # rewriting replaces, never appends
    assert s.read_bytes("tables/a/x.parquet") == b"3"
    with pytest.raises(FileNotFoundError):
        s.read_bytes("tables/a/nothing.parquet")


def test_quarantine_moves_aside_and_never_deletes(tmp_path):
    s = Store.open(tmp_path)
    s.write_bytes("runs/r1/final.pt", b"damaged")
    where = s.quarantine("runs/r1/final.pt")
    assert not s.exists("runs/r1/final.pt") and Path(where).read_bytes() == b"damaged" and "/_quarantine/" in where


def test_a_store_travels_as_its_location(tmp_path):
    """Pickled to a Ray worker, a store is opened again there from its location (credentials stay on the node)."""
    s = Store.open(f"file://{tmp_path}")
    t = pickle.loads(pickle.dumps(s))
    assert t.location == s.location and t.base == s.base
    assert is_uri("s3://b/p") and is_uri("gs://b") and not is_uri("results") and not is_uri("C:\\x")


def test_s3_endpoint_comes_from_the_uri_or_the_environment(monkeypatch):
    """pyarrow ignores AWS_ENDPOINT_URL; the store adds it to an S3 URI that names no endpoint."""
    from pipeline.store.objects import _with_env_endpoint

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert "endpoint_override=127.0.0.1%3A9000" in _with_env_endpoint("s3://b/p") and "scheme=http" in _with_env_endpoint("s3://b/p")
    assert _with_env_endpoint("s3://b/p?endpoint_override=h:1") == "s3://b/p?endpoint_override=h:1"
    assert _with_env_endpoint("gs://b/p") == "gs://b/p"


def test_a_node_copies_data_from_a_uri_once_under_a_lock(tmp_path, mnist_dir):
    """Two processes on one node ask for MNIST from a URI at once: one copies it into the node cache, both use it."""
    src = tmp_path / "bucket"
    src.mkdir()
    (src / "mnist.npz").write_bytes((mnist_dir / "mnist.npz").read_bytes())
    code = (
        "import sys; from pipeline.datasource import DataSource\n"
        f"src = DataSource.open('file://{src}'); d = src.folder('mnist'); print(d); assert src.load('mnist').test.shape == (10000, 784)\n"
    )
    env = {"IWAE_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    folders = {o[0].strip() for o in outs}
    assert len(folders) == 1 and (Path(folders.pop()) / "mnist.npz").exists()
    assert not list((tmp_path / "cache").rglob("_mnist.npz"))  # no half-copied file left behind


def test_results_of_an_older_format_are_refused(tmp_path):
    """A results folder from before the pixel fix (format 1) is not mixed with new numbers: one line, a new location."""
    from pipeline.errors import UserError
    from pipeline.store.results import MARKER, Results

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / MARKER).write_text('{"format": "iwae-pipeline/1"}')
    with pytest.raises(UserError, match="older iwae-pipeline.*new location"):
        Results.open(tmp_path / "old")
    assert Results.open(tmp_path / "new").store.exists(MARKER)
    Results.open(tmp_path / "new")  # ours, current: opens again


def test_a_location_with_credentials_is_refused_and_never_printed():
    """s3://KEY:SECRET@bucket/p (which Arrow accepts) and secret query values: one line naming the supported ways, no secret in it."""
    from pipeline.datasource import DataSource
    from pipeline.errors import UserError
    from pipeline.store.objects import redact

    for loc in ("s3://AKIAKEY:s3cr3tvalue@bucket/p", "s3://bucket/p?region=us-east-1&secret_key=s3cr3tvalue&access_key=AKIAKEY"):
        for opener in (Store.open, DataSource.open):
            with pytest.raises(UserError) as e:
                opener(loc)
            msg = str(e.value)
            assert "s3cr3tvalue" not in msg and "AKIAKEY" not in msg and "\n" not in msg
            assert "environment variables" in msg and "IAM role" in msg and "endpoint_override" in msg
    assert redact("s3://b/p?endpoint_override=127.0.0.1:9000&session_token=t0k") == "s3://b/p?endpoint_override=127.0.0.1:9000&session_token=***"
    assert redact("gs://u:pw@b/p") == "gs://***@b/p" and redact("/abs/results") == "/abs/results"


@pytest.mark.slow
def test_sweep_with_credentials_in_results_exits_2_without_printing_them(tmp_path, mnist_dir):
    """The CLI as a user meets it: `sweep demo --results s3://K:S@b/p` exits 2 with one line, and the secret is in no output."""
    cli = str(Path(sys.executable).parent / "iwae-pipeline")
    secret = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"
    r = subprocess.run(
        [cli, "sweep", "demo", "--size", "smoke", "--results", f"s3://AKIDEXAMPLE:{secret}@bucket/p", "--data-dir", str(mnist_dir)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "holds credentials" in lines[0], r.stderr[-3000:]
    assert secret not in r.stdout + r.stderr and "AKIDEXAMPLE" not in r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_stale_node_cache_is_rebuilt_from_the_data_uri(tmp_path, mnist_dir, monkeypatch):
    """A node cache holding an mnist.npz from before the pixel fix, --data-dir a file:// URI with a current copy: rebuilt, then it loads."""
    import hashlib

    import numpy as np

    from iwae import data as D
    from pipeline.datasource import DataSource

    src = tmp_path / "bucket"
    src.mkdir()
    (src / "mnist.npz").write_bytes((mnist_dir / "mnist.npz").read_bytes())
    monkeypatch.setenv("IWAE_CACHE_DIR", str(tmp_path / "cache"))
    data = DataSource.open(f"file://{src}")
    cache = tmp_path / "cache" / hashlib.sha256(data.location.encode()).hexdigest()[:12]
    stale = {k: np.full((2, 784), 255 / 256, np.float32) for k in ("x_train", "x_valid", "x_test")}  # no version: pixels /256
    D.atomic_save_npz(cache / D.MNIST_NPZ, stale)
    with pytest.raises(D.DataError, match="stale"):
        D.load_mnist(cache)
    assert data.folder("mnist") == cache
    assert (cache / D.MNIST_NPZ).read_bytes() == (src / "mnist.npz").read_bytes()
    assert data.load("mnist").test.shape == (10000, 784)


def test_a_current_node_cache_is_loaded_once(tmp_path, mnist_dir, monkeypatch):
    """--data-dir a URI whose copy is already in the node cache: checking that the cache reads is the one load (authors split kept)."""
    import shutil

    import pipeline.datasource as ds
    from iwae import data as D

    src = tmp_path / "bucket"
    src.mkdir()
    shutil.copy(mnist_dir / D.MNIST_NPZ, src / D.MNIST_NPZ)
    monkeypatch.setenv("IWAE_CACHE_DIR", str(tmp_path / "cache"))
    data = ds.DataSource.open(f"file://{src}")
    data.folder("mnist")  # fills the cache
    loads = []
    monkeypatch.setattr(ds, "load_dataset", lambda *a: loads.append(a) or D.load_dataset(*a))
    assert data.load("mnist", "authors").train.shape == (D.AUTHORS_MNIST_TRAIN, 784)
    assert [a[2] for a in loads] == ["authors"]


def test_whole_file_writes_keep_the_usual_file_mode(tmp_path):
    """A file written whole gets the mode any new file gets (umask), not mkstemp's owner-only 0600."""
    import iwae.files as files

    files.write_atomic(tmp_path / "a" / "f.parquet", b"x")
    (tmp_path / "plain").write_bytes(b"x")
    assert (tmp_path / "a" / "f.parquet").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o666 & ~files._UMASK


def test_create_on_s3_is_exclusive_even_when_both_writers_saw_no_object(monkeypatch):
    """Two writers that both looked before either wrote (the race a check-then-put loses): on S3 the
    conditional PUT lets exactly one win, the other gets False, and the object holds the winner's
    bytes. A server without conditional writes (501) falls back to check-then-put."""
    from pipeline.store import objects as storage
    from tests.cluster.fixture import S3Server

    s3 = S3Server()
    try:
        for form in ("hostport", "url"):  # both endpoint forms pyarrow takes, for every operation, create included
            store = Store.open(s3.uri(f"cas-{form}", form=form))
            with monkeypatch.context() as m:
                m.setattr(Store, "exists", lambda self, key: False)  # both saw nothing
                assert store.create("lease.json", b"first") is True
                assert store.create("lease.json", b"second") is False
            assert store.read_bytes("lease.json") == b"first" and store.exists("lease.json")
            store.write_bytes("t/a.bin", b"a")
            assert store.list("t") == ["t/a.bin"] and store.read_bytes("t/a.bin") == b"a"
            with monkeypatch.context() as m:
                m.setattr(storage, "_s3_put_if_absent", lambda location, path, data: None)
                assert store.create("_other.json", b"x") is True and store.read_bytes("_other.json") == b"x"
    finally:
        s3.stop()


class FakeGCS:
    """GCS's JSON upload API on loopback, as far as a multipart upload goes, with GCS's one rule that
    matters here: ``ifGenerationMatch=0`` meets an existing object with 412 (an upload without it
    overwrites). ``objects``: (bucket, name) -> bytes."""

    def __init__(self) -> None:
        import json
        import re
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlparse

        objects: dict[tuple[str, str], bytes] = {}
        self.objects = objects

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                url = urlparse(self.path)
                m = re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", url.path)
                query = parse_qs(url.query)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if not m or query.get("uploadType") != ["multipart"]:
                    return self.reply(400, {"error": {"code": 400, "message": f"not faked: {self.path}"}})
                boundary = re.search(r'boundary="?([^";]+)"?', self.headers["Content-Type"]).group(1).encode()
                parts = [p.split(b"\n\n", 1)[1][:-1] for p in body.split(b"--" + boundary)[1:-1]]  # each part: headers, blank line, content, newline
                name, data = json.loads(parts[0])["name"], parts[1]
                key = (m.group(1), name)
                if query.get("ifGenerationMatch") == ["0"] and key in objects:
                    return self.reply(412, {"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold."}})
                objects[key] = data
                self.reply(200, {"kind": "storage#object", "bucket": key[0], "name": name, "size": str(len(data)), "generation": "1"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_create_on_gcs_is_exclusive_even_when_both_writers_saw_no_object(monkeypatch):
    """The same race on GCS: the create-only upload (``ifGenerationMatch=0``) lets exactly one of two
    writers that both saw no object win, and the object keeps the winner's bytes. The fake server
    keeps GCS's rule (412 only under the precondition), so a plain upload would fail this test."""
    gcs = FakeGCS()
    try:
        store = Store.open(f"gs://bkt/res?endpoint_override=127.0.0.1:{gcs.port}&scheme=http")
        monkeypatch.setattr(Store, "exists", lambda self, key: False)  # both saw nothing
        assert store.create("lease.json", b"first") is True
        assert store.create("lease.json", b"second") is False
        assert gcs.objects == {("bkt", "res/lease.json"): b"first"}
    finally:
        gcs.stop()


def test_a_gcs_location_without_gcsfs_is_refused_in_one_line(monkeypatch):
    """Without gcsfs a gs:// location would lose its exclusive create; it is refused at open, naming the extra."""
    import importlib.util

    from pipeline.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a))
    with pytest.raises(UserError, match=r"needs gcsfs .*pip install 'iwae-pipeline\[gcs\]'") as e:
        Store.open("gs://bkt/res")
    assert "\n" not in str(e.value)


def test_report_out_to_s3_writes_there_and_nothing_local(tmp_path, monkeypatch, capsys):
    """`report --out s3://...` (both endpoint forms) writes report.md, the plots and summary.parquet into
    the bucket and nothing on the local disk (a Path option once made a local folder named `s3:`)."""
    from pipeline.cli import main
    from pipeline.store.results import Results
    from tests.cluster.fixture import S3Server
    from tests.fakes import add_estimate, add_run, run, seq

    res = Results.open(str(tmp_path / "res"))
    for obj in ("vae", "iwae"):
        cfg = run(obj, 5, 0)
        add_run(res, cfg)
        add_estimate(res, cfg.run_id, seq([-100.0, -101.0, -99.0]))
    monkeypatch.chdir(tmp_path)
    s3 = S3Server()
    try:
        for i, uri in enumerate((s3.uri("rep0"), f"s3://{s3.bucket}/rep1?endpoint_override=http://{s3.endpoint}&region=us-east-1")):
            assert main(["report", "--results", str(tmp_path / "res"), "--out", uri]) == 0, capsys.readouterr().err
            keys = {k.rsplit("/", 1)[1] for k in s3.keys(f"rep{i}")}
            assert {"report.md", "summary.parquet", "active_units.png"} <= keys, keys
    finally:
        s3.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]  # no s3: folder, no report beside the results
    assert not (tmp_path / "res" / "report").exists()


def test_a_location_is_undone_only_while_nothing_but_its_marker_is_there(tmp_path):
    """A command that created a location and stops before any work removes what it made (its marker and
    empty folders); once anything else is there (another command started on it meanwhile) it stays."""
    from pipeline.store.results import MARKER, Results

    mine = Results.open(str(tmp_path / "mine"))
    (tmp_path / "mine" / "_check" / "x").mkdir(parents=True)  # the storage probe's empty folders
    mine.discard_if_new()
    assert not (tmp_path / "mine").exists()
    shared = Results.open(str(tmp_path / "shared"))
    (tmp_path / "shared" / "leases" / "r1").mkdir(parents=True)
    (tmp_path / "shared" / "leases" / "r1" / "000001.json").write_text("{}")  # another command's lease
    shared.discard_if_new()
    assert (tmp_path / "shared" / MARKER).exists() and (tmp_path / "shared" / "leases" / "r1" / "000001.json").exists()


def test_storage_errors_are_classified_once_and_only_transient_ones_are_retried():
    """Throttling, 5xx, dropped connections and timeouts are transient (tried again, with backoff);
    access denied, bad keys, no such bucket and a read-only disk are permanent (one line at once,
    StoreDenied); a store that keeps failing past the bound is StoreFailing, which says it is failing."""
    import errno

    from pipeline.store.errors import StoreDenied, StoreFailing, permanent, retrying, transient

    for e in (
        OSError("When reading information for key 'k' in bucket 'b': AWS Error SLOW_DOWN during GetObject operation"),
        OSError("AWS Error NETWORK_CONNECTION during ListObjectsV2 operation: curlCode: 52, Server returned nothing"),
        OSError("AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body."),
        OSError("AWS Error INTERNAL_FAILURE during GetObject operation"),
        TimeoutError("read timed out"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    ):
        assert transient(e) and not permanent(e), e
    for e in (
        PermissionError("AccessDenied"),
        OSError("AWS Error ACCESS_DENIED during HeadObject operation: No response body."),
        OSError("AWS Error UNKNOWN (HTTP status 403) during HeadObject operation"),
        OSError("InvalidAccessKeyId: The AWS Access Key Id you provided does not exist"),
        FileNotFoundError("NoSuchBucket: The specified bucket does not exist"),
        OSError(errno.EROFS, "Read-only file system"),
    ):
        assert permanent(e) and not transient(e), e
    assert not transient(FileNotFoundError("no such key")) and not permanent(FileNotFoundError("no such key"))

    calls, pauses = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error SLOW_DOWN during PutObject operation")
        return "written"

    assert retrying(flaky, "PUT s3://b/k", sleep=pauses.append) == "written" and len(calls) == 3 and len(pauses) == 2 and all(p >= 0 for p in pauses)
    denied = []

    def refused():
        denied.append(1)
        raise PermissionError("AccessDenied")

    with pytest.raises(StoreDenied, match="refuses this request.*credentials"):
        retrying(refused, "PUT s3://b/k", sleep=pauses.append)
    assert len(denied) == 1  # never retried

    def down():
        raise OSError("AWS Error UNKNOWN (HTTP status 503)")

    with pytest.raises(StoreFailing, match="kept failing") as got:
        retrying(down, "GET s3://b/k", deadline_s=0.05, sleep=lambda s: time.sleep(min(s, 0.01)))
    assert "credentials" not in str(got.value)


def test_an_s3_head_tells_a_missing_key_from_a_missing_bucket():
    """A HEAD's 404 has no body, so a missing bucket looks like a missing key: `exists` of a key that
    is not there is False in a bucket that is, and a refusal naming the bucket in one that is not
    (never "no results there, run sweep first")."""
    from pipeline.store.errors import StoreDenied
    from tests.cluster.fixture import S3Server

    s3 = S3Server()
    try:
        store = Store.open(s3.uri("heads"))
        assert store.exists("nothing.json") is False and store.size("nothing.json") is None
        store.write_bytes("k.json", b"12345")
        assert store.exists("k.json") and store.size("k.json") == 5
        typo = Store.open(s3.uri("heads").replace(f"s3://{s3.bucket}/", "s3://no-such-bucket-here/"))
        with pytest.raises(StoreDenied, match="no-such-bucket-here"):
            typo.exists("k.json")
    finally:
        s3.stop()
