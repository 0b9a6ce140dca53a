"""One storage layer for every file the pipeline reads or writes: a local folder or object storage.

A location is a local path (the embedded default) or a URI that ``pyarrow.fs.FileSystem.from_uri``
resolves: ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``file:///abs/path``, ... S3 options such
as ``endpoint_override``, ``scheme`` and ``region`` come from the URI's query, the way Ray's own
``storage_path`` takes them (``s3://b/p?endpoint_override=127.0.0.1:9000&scheme=http``). pyarrow
ignores ``AWS_ENDPOINT_URL*``, so an S3 URI without ``endpoint_override`` takes it from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` here. Credentials are never part of a location: each
node finds its own (environment, config files, the node's IAM role), which is why a ``Store`` pickles
as its location and is opened again wherever it lands.

Requests: on S3 whole-object reads and writes go through s3fs (one GET, one PUT each; botocore's
adaptive retries), listings and everything else through pyarrow (its standard retry strategy);
whatever escapes the clients' retries is classified once by :mod:`pipeline.store.errors`.

Writes are whole and atomic. On a local disk a file is written under a ``_``-prefixed temporary name
in its final folder, fsynced and renamed into place. An object store has no rename, but a single PUT
of a whole object is atomic: the payload is built in memory first and written in one call, so a
killed writer leaves either the old object or the new one, never a part. Readers skip names that
start with ``_`` or ``.``.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from iwae.files import create_atomic, write_atomic
from pipeline.errors import UserError
from pipeline.store.errors import retrying

Keys = list[str]
QUARANTINE = "_quarantine"  # damaged files are moved here, never deleted
READ_BACK_S = 1.0  # a create the store cannot make exclusive reads back after this pause
T = TypeVar("T")


def is_uri(location: str | Path) -> bool:
    """True for ``scheme://...`` (a one-letter scheme is a Windows drive, not a URI)."""
    scheme = urlparse(str(location)).scheme
    return len(scheme) > 1 and "://" in str(location)


# query parameters that carry a secret (pyarrow takes none of them, but a user may try): never printed
_SECRET_PARAM = re.compile(r"secret|token|passw|credential|signature|(^|_)key$", re.IGNORECASE)


def redact(location: str) -> str:
    """``location`` as it may be printed: a user or password part and secret query values as ``***``."""
    if not is_uri(location):
        return location
    url = urlparse(location)
    netloc = f"***@{url.netloc.rsplit('@', 1)[1]}" if "@" in url.netloc else url.netloc
    query = "&".join(f"{k}={'***' if _SECRET_PARAM.search(k) else v}" for k, v in parse_qsl(url.query, keep_blank_values=True))
    return urlunparse(url._replace(netloc=netloc, query=query))


def refuse_credentials(location: str) -> None:
    """A location never holds credentials: it is printed, logged and pickled to every node. Arrow
    would take ``s3://KEY:SECRET@bucket/p``; this refuses it in one line."""
    if not is_uri(location):
        return
    url = urlparse(location)
    if "@" in url.netloc or any(_SECRET_PARAM.search(k) for k, _ in parse_qsl(url.query, keep_blank_values=True)):
        raise UserError(
            f"{redact(location)} holds credentials, which a location never should (it is printed, logged and sent to every node); "
            "give each node its own through environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or the node's IAM role, "
            "and an S3-compatible server's address as endpoint_override=HOST:PORT in the query"
        )


def _with_env_endpoint(uri: str) -> str:
    """Add ``endpoint_override``/``scheme`` from ``AWS_ENDPOINT_URL(_S3)`` to an S3 URI that has none."""
    url = urlparse(uri)
    query = dict(parse_qsl(url.query))
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if url.scheme != "s3" or "endpoint_override" in query or not endpoint:
        return uri
    ep = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    query.setdefault("endpoint_override", ep.netloc)
    query.setdefault("scheme", ep.scheme or "https")
    return urlunparse(url._replace(query=urlencode(query)))


def endpoint_url(query: dict[str, str], default: str = "") -> str:
    """The endpoint of a location's query as a URL, in either form pyarrow takes: ``endpoint_override=
    HOST:PORT`` with ``scheme=http`` (https by default), or ``endpoint_override=http://HOST:PORT``."""
    endpoint = query.get("endpoint_override", default)
    if "://" in endpoint:
        return endpoint
    return f"{query.get('scheme', 'https')}://{endpoint}"


S3_ATTEMPTS = int(os.environ.get("IWAE_S3_CLIENT_ATTEMPTS", "10"))  # each client's own tries of a request, before the store's retries (pipeline.store.errors)
_S3: dict[tuple[str, str, bool], Any] = {}


def _s3(location: str) -> Any:
    """This process's s3fs client for ``location``'s endpoint (made once): one request per whole-object
    read or write (pyarrow's S3 stream takes two and three: HEAD + GET, a multipart create, part and
    complete), botocore's ``adaptive`` retry mode (backoff, and a client-side rate limit under
    throttling), and the node's own credentials. The client takes the location's
    ``endpoint_override``/``scheme``/``region``/``anonymous``, as pyarrow's does."""
    import s3fs

    query = dict(parse_qsl(urlparse(_with_env_endpoint(location)).query))
    endpoint = endpoint_url(query) if "endpoint_override" in query else ""
    region, anon = query.get("region", ""), query.get("anonymous", "").lower() == "true"
    key = (endpoint, region, anon)
    if key not in _S3:
        client: dict[str, str] = {}
        if endpoint:
            client["endpoint_url"] = endpoint
        if region:
            client["region_name"] = region
        _S3[key] = s3fs.S3FileSystem(
            anon=anon,
            client_kwargs=client,
            config_kwargs={"retries": {"max_attempts": S3_ATTEMPTS, "mode": "adaptive"}, "connect_timeout": 10, "read_timeout": 60},
            use_listings_cache=False,
            skip_instance_cache=True,
            max_concurrency=1,  # a whole-object read is one GET (above 1, s3fs asks the size first: a HEAD per read)
        )
    return _S3[key]


_BUCKETS: set[tuple[str, str]] = set()  # (location's endpoint, bucket) seen to exist by this process


def _s3_head(location: str, path: str) -> int | None:
    """One HEAD of ``bucket/key`` (``path``): the object's size, or None when there is none. A HEAD's
    404 has no body, so a missing bucket looks like a missing key: the first 404 of a bucket asks the
    bucket once (HeadBucket), and a bucket that is not there raises, as a permanent error."""
    bucket, _, key = path.partition("/")
    fs = _s3(location)
    try:
        head = fs.call_s3("head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        where = (urlparse(location).query, bucket)
        if where not in _BUCKETS:
            try:
                fs.call_s3("head_bucket", Bucket=bucket)
            except FileNotFoundError:
                raise FileNotFoundError(f"NoSuchBucket: the bucket {bucket} does not exist") from None
            _BUCKETS.add(where)
        return None
    _BUCKETS.add((urlparse(location).query, bucket))
    return int(head.get("ContentLength") or 0)


def _s3_put_if_absent(location: str, path: str, data: bytes) -> bool | None:
    """PUT ``bucket/key`` (``path``) only if no object is there: True when written, False when one
    was, None when the server does not implement conditional writes."""
    try:
        _s3(location).pipe_file(path, data, mode="create")  # one PUT with If-None-Match: * (s3fs 2024.12.0+, botocore > 1.35.20)
    except FileExistsError:  # 412 Precondition Failed on If-None-Match: another writer's object is there
        return False
    except OSError as e:  # s3fs's translation of the server's error; its botocore error is the cause
        code = (getattr(e.__cause__, "response", None) or {}).get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):  # another writer's object, or its PUT racing ours
            return False
        if code in ("NotImplemented", "501") or e.errno == errno.ENOSYS:  # no conditional writes here
            return None
        raise
    return True


GCS_SCHEMES = ("gs", "gcs")  # pyarrow's and gcsfs's names for Google Cloud Storage


def _gcs_put_if_absent(location: str, path: str, data: bytes) -> bool:
    """Upload ``bucket/key`` (``path``) only if no object is there (GCS's ``ifGenerationMatch=0``, which
    the server answers with 412 when one is): True when written, False when one was. Through gcsfs,
    since pyarrow does not expose preconditions. It takes the location's ``endpoint_override`` and
    ``scheme`` as pyarrow's does, and the node's own credentials (Google's application default
    credentials), or none for a plain-http endpoint (an emulator), again as pyarrow does. A retry
    after a write whose reply was lost reads False: callers read the object back. gcsfs's core
    JSON-API client, the API pyarrow speaks: its default class first asks a gRPC control API whether
    the bucket is zonal, which an emulator never answers (60 s per call)."""
    from gcsfs.core import GCSFileSystem

    query = dict(parse_qsl(urlparse(location).query))
    endpoint = endpoint_url(query, "storage.googleapis.com")  # not STORAGE_EMULATOR_HOST, which pyarrow ignores
    plain = endpoint.startswith("http://")
    fs = GCSFileSystem(endpoint_url=endpoint, token="anon" if plain else "google_default")  # no silent anonymous fallback
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:  # 412 Precondition Failed: another writer's object is there
        return False
    return True


def _pyarrow_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for a URI; on S3 with the standard retry strategy at :data:`S3_ATTEMPTS`
    (its default is 3, and its retry quota runs dry under sustained throttling)."""
    fs, base = pafs.FileSystem.from_uri(uri)
    if isinstance(fs, pafs.S3FileSystem):
        query = dict(parse_qsl(urlparse(uri).query))
        kwargs: dict[str, Any] = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS), "region": fs.region}
        if "endpoint_override" in query:
            kwargs["endpoint_override"] = query["endpoint_override"]
        if "scheme" in query:
            kwargs["scheme"] = query["scheme"]
        if query.get("anonymous", "").lower() == "true":
            kwargs["anonymous"] = True
        fs = pafs.S3FileSystem(**kwargs)
    return fs, base


class Entry(NamedTuple):
    """A file of a listing: its key, size in bytes and modification time by the store's clock (s)."""

    key: str
    size: int
    mtime: float


_SKEW: dict[str, float] = {}


@dataclass(frozen=True)
class Store:
    """A folder-like location: ``base`` inside ``fs``; every method takes a ``/``-separated key.

    Every request goes through :func:`pipeline.store.errors.retrying`: transient errors are tried
    again with backoff, permanent ones are one line (:class:`~pipeline.store.errors.StoreDenied`)."""

    location: str  # as the user gave it (a local one made absolute; never credentials, see refuse_credentials): what pickles carry
    fs: pafs.FileSystem
    base: str
    retry_s: float | None = None  # how long a request is retried (None: IWAE_STORE_RETRY_SECONDS); a lease's renewal asks for less

    @classmethod
    def open(cls, location: str | Path) -> Store:
        loc = str(location)
        if not is_uri(loc):
            path = Path(loc).expanduser().absolute()
            return cls(str(path), pafs.LocalFileSystem(), path.as_posix())
        refuse_credentials(loc)
        if urlparse(loc).scheme in GCS_SCHEMES and importlib.util.find_spec("gcsfs") is None:
            raise UserError(f"{redact(loc)} is on GCS, which needs gcsfs (the exclusive writes of the evaluation identity): pip install 'iwae-pipeline[gcs]'")
        try:  # resolving a bucket's region asks the network: retried like any request
            fs, base = retrying(lambda: _pyarrow_fs(_with_env_endpoint(loc)), f"OPEN {redact(loc)}")
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
            raise UserError(
                f"cannot open {redact(loc)} ({str(e).splitlines()[0][:160]}); check the URI (s3://bucket/prefix?endpoint_override=HOST:PORT)"
            ) from None
        return cls(loc, fs, base.rstrip("/"))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Store.open, (self.location,))

    def sub(self, key: str) -> Store:
        """The store of the folder ``key`` below this one (same filesystem and options)."""
        if self.is_local:
            return Store.open(self.path(key))
        url = urlparse(self.location)
        return Store(urlunparse(url._replace(path=f"{url.path.rstrip('/')}/{key}")), self.fs, self.path(key))

    # ------------------------------------------------------------------ names

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def is_s3(self) -> bool:
        return urlparse(self.location).scheme == "s3"

    def path(self, key: str = "") -> str:
        return f"{self.base}/{key}".rstrip("/") if key else self.base

    def uri(self, key: str = "") -> str:
        """The location of ``key`` as a user would type it (no query string)."""
        if self.is_local:
            return self.path(key)
        url = urlparse(self.location)
        return f"{url.scheme}://{self.path(key)}"

    def _do(self, call: Callable[[], T], what: str, key: str = "") -> T:
        return retrying(call, f"{what} {self.uri(key)}", self.retry_s)

    def retrying_for(self, seconds: float) -> Store:
        """This store, its requests retried for at most ``seconds`` (a lease's renewal must end well within the lease)."""
        return Store(self.location, self.fs, self.base, seconds)

    def size(self, key: str) -> int | None:
        """The size of ``key`` in bytes (one HEAD); None when it is not a file."""

        def head() -> int | None:
            if self.is_s3:  # HEAD only: pyarrow's file info follows a missing key's 404 with a LIST (is it a folder?)
                return _s3_head(self.location, self.path(key))
            info = self.fs.get_file_info(self.path(key))
            return int(info.size or 0) if info.type == pafs.FileType.File else None

        return self._do(head, "HEAD", key)

    # ------------------------------------------------------------------ reads

    def exists(self, key: str) -> bool:
        """Whether ``key`` is a file (one HEAD)."""
        return self.size(key) is not None

    def read_bytes(self, key: str) -> bytes:
        """The whole object (one GET on S3). ``FileNotFoundError`` when absent."""

        def get() -> bytes:
            if self.is_s3:
                return bytes(_s3(self.location).cat_file(self.path(key)))
            with self.fs.open_input_stream(self.path(key)) as f:
                return bytes(f.read())

        return self._do(get, "GET", key)

    def read_many(self, keys: Sequence[str], threads: int = 32, parse: Callable[[str, bytes | None], Any] | None = None) -> list[Any]:
        """Whole objects, read in parallel (``None`` for a key that is gone), in order. ``parse(key,
        data)``: applied in the reading thread, so that only what it returns is kept (a reader of
        thousands of Parquet files holds their tables, not their bytes as well)."""
        from concurrent.futures import ThreadPoolExecutor

        def one(key: str) -> Any:
            try:
                data: bytes | None = self.read_bytes(key)
            except FileNotFoundError:
                data = None
            return parse(key, data) if parse is not None else data

        if len(keys) <= 1:
            return [one(k) for k in keys]
        with ThreadPoolExecutor(max_workers=min(threads, len(keys)), thread_name_prefix="store-read") as pool:
            return list(pool.map(one, keys))

    def entries(self, prefix: str, suffix: str = "", hidden: bool = False) -> list[Entry]:
        """The files below ``prefix`` (recursive, sorted; one listing request per 1,000 keys on an
        object store), with their sizes and modification times; ``_``/``.`` names skipped unless ``hidden``."""
        sel = pafs.FileSelector(self.path(prefix), recursive=True, allow_not_found=True)
        infos = self._do(lambda: self.fs.get_file_info(sel), "LIST", prefix)
        out = []
        for info in infos:
            if info.type != pafs.FileType.File or not info.path.endswith(suffix):
                continue
            key = info.path[len(self.base) + 1 :] if self.base else info.path
            if not hidden and any(part.startswith(("_", ".")) for part in key.split("/")):
                continue
            out.append(Entry(key, int(info.size or 0), (info.mtime_ns or 0) / 1e9))
        return sorted(out)

    def list(self, prefix: str, suffix: str = "") -> list[str]:
        """Keys of the files below ``prefix`` (recursive, sorted), skipping ``_``/``.`` names."""
        return [e.key for e in self.entries(prefix, suffix)]

    def read_table(self, key: str, schema: pa.Schema) -> pa.Table:
        """One Parquet file with the declared schema (raises ``pa.ArrowInvalid``/``OSError`` if damaged)."""
        return pq.read_table(pa.BufferReader(self.read_bytes(key)), schema=schema)

    def now(self) -> float:
        """The store's clock now (s since the epoch): this machine's, corrected by the offset of an
        object written here once per process (modification times are the store's clock, so leases
        expire by one clock whatever each node's says)."""
        if self.is_local:
            return time.time()
        if self.location not in _SKEW:
            key = f"_clock/{uuid.uuid4().hex}"
            t0 = time.time()
            self.write_bytes(key, b"")
            t1 = time.time()
            got = [e for e in self.entries("_clock", hidden=True) if e.key == key]
            self.delete(key)
            _SKEW[self.location] = (got[0].mtime - (t0 + t1) / 2) if got else 0.0
        return time.time() + _SKEW[self.location]

    # ------------------------------------------------------------------ writes

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a whole object atomically (temp name + rename locally, one PUT on object stores)."""

        def put() -> None:
            if self.is_local:
                write_atomic(self.path(key), data)
            elif self.is_s3:
                _s3(self.location).pipe_file(self.path(key), data)
            else:
                with self.fs.open_output_stream(self.path(key)) as f:
                    f.write(data)  # one call with the whole payload: nothing to complete half-way

        self._do(put, "PUT", key)

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only where there is none; returns whether this call wrote it.

        Exclusive on a local disk (a hard link, :func:`iwae.files.create_atomic`), on S3 through S3's
        conditional PUT (``If-None-Match: *``; AWS since 2024, MinIO, moto) and on GCS through its
        create-only upload (``ifGenerationMatch=0``). pyarrow exposes neither, so they go through
        s3fs and gcsfs. Where the store cannot guarantee it (another object store, or an S3 server
        that answers the header with 501) it checks, writes and reads back after a pause: True only
        when the object still holds these bytes (``data`` should be unique to the writer)."""
        if self.is_local:
            return self._do(lambda: create_atomic(self.path(key), data), "CREATE", key)
        scheme = urlparse(self.location).scheme
        written: bool | None = None
        if scheme == "s3":
            written = self._do(lambda: _s3_put_if_absent(self.location, self.path(key), data), "CREATE", key)
        elif scheme in GCS_SCHEMES:
            if self.exists(key):
                return False
            written = self._do(lambda: _gcs_put_if_absent(self.location, self.path(key), data), "CREATE", key)
        if written is not None:
            return written
        if self.exists(key):
            return False
        self.write_bytes(key, data)
        time.sleep(READ_BACK_S)  # a racing writer's PUT lands in this window or not at all
        try:
            return self.read_bytes(key) == data
        except FileNotFoundError:
            return False

    def write_table(self, key: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(key, sink.getvalue().to_pybytes())

    def quarantine(self, key: str) -> str:
        """Move a damaged file aside (``_quarantine/<key>.<time>``), never delete it; returns where to."""
        dest = f"{QUARANTINE}/{key}.{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        if self.is_local:
            Path(self.path(dest)).parent.mkdir(parents=True, exist_ok=True)
        self._move(key, dest)
        return self.uri(dest)

    def _move(self, key: str, dest: str) -> None:
        """A move that a retry after a lost answer does not undo: on an object store it is a copy and a
        delete, so a source gone with the destination there is a move done."""

        def mv() -> None:
            try:
                self.fs.move(self.path(key), self.path(dest))
            except FileNotFoundError:
                if self.fs.get_file_info(self.path(dest)).type != pafs.FileType.File:
                    raise

        self._do(mv, "MOVE", key)

    def move(self, key: str, dest: str) -> None:
        """Move one file to ``dest`` (``repair``'s migration of an earlier layout)."""
        if self.is_local:
            Path(self.path(dest)).parent.mkdir(parents=True, exist_ok=True)
        self._move(key, dest)

    def delete_dir(self, prefix: str) -> None:
        def rm() -> None:
            info = self.fs.get_file_info(self.path(prefix))
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path(prefix))

        self._do(rm, "DELETE", prefix)

    def list_all(self) -> Keys:
        """Every key below this location, hidden names (``_``, ``.``) included, sorted."""
        return [e.key for e in self.entries("", hidden=True)]

    def delete(self, key: str) -> None:
        """Delete one file; one already gone (a retry after a lost answer) is deleted."""

        def rm() -> None:
            try:
                self.fs.delete_file(self.path(key))
            except FileNotFoundError:
                pass

        self._do(rm, "DELETE", key)

    def remove_empty_dir(self) -> None:
        """Remove this location's folder on a local disk if it holds no file: its empty folders
        (``_check/`` of the storage probe) go first; a folder holding anything stays."""
        import contextlib

        root = Path(self.path())
        for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()

    def is_empty(self) -> bool:
        sel = pafs.FileSelector(self.path(), recursive=False, allow_not_found=True)
        return not self._do(lambda: self.fs.get_file_info(sel), "LIST")

    def kind(self) -> pafs.FileType:
        return self._do(lambda: self.fs.get_file_info(self.path()).type, "HEAD")
