"""One storage layer for every file the pipeline reads or writes: a local folder or object storage.

A location is a local path (the embedded default) or a URI that ``pyarrow.fs.FileSystem.from_uri``
resolves: ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``file:///abs/path``, ... S3 options such
as ``endpoint_override``, ``scheme`` and ``region`` come from the URI's query, the way Ray's own
``storage_path`` takes them (``s3://b/p?endpoint_override=127.0.0.1:9000&scheme=http``). pyarrow
ignores ``AWS_ENDPOINT_URL*``, so an S3 URI without ``endpoint_override`` takes it from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` here. Credentials are never part of a location: each
node finds its own (environment, config files, the node's IAM role), which is why a ``Store`` pickles
as its location and is opened again wherever it lands.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from iwae.files import create_atomic, write_atomic
from pipeline.errors import UserError

Keys = list[str]
QUARANTINE = "_quarantine"  # damaged files are moved here, never deleted


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


def _s3_put_if_absent(location: str, path: str, data: bytes) -> bool | None:
    """PUT ``bucket/key`` (``path``) only if no object is there: True when written, False when one
    was, None when the server does not implement conditional writes. The client takes the
    location's ``endpoint_override``/``scheme``/``region``/``anonymous`` and the node's own credentials,
    as pyarrow's does."""
    import s3fs

    query = dict(parse_qsl(urlparse(_with_env_endpoint(location)).query))
    client: dict[str, str] = {}
    if "endpoint_override" in query:
        client["endpoint_url"] = endpoint_url(query)
    if "region" in query:
        client["region_name"] = query["region"]
    fs = s3fs.S3FileSystem(anon=query.get("anonymous", "").lower() == "true", client_kwargs=client)
    try:
        fs.pipe_file(path, data, mode="create")  # one PUT with If-None-Match: * (s3fs 2024.12.0+, botocore > 1.35.20)
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


@dataclass(frozen=True)
class Store:
    """A folder-like location: ``base`` inside ``fs``; every method takes a ``/``-separated key."""

    location: str  # as the user gave it (a local one made absolute; never credentials, see refuse_credentials): what pickles carry
    fs: pafs.FileSystem
    base: str

    @classmethod
    def open(cls, location: str | Path) -> Store:
        loc = str(location)
        if not is_uri(loc):
            path = Path(loc).expanduser().absolute()
            return cls(str(path), pafs.LocalFileSystem(), path.as_posix())
        refuse_credentials(loc)
        if urlparse(loc).scheme in GCS_SCHEMES and importlib.util.find_spec("gcsfs") is None:
            raise UserError(f"{redact(loc)} is on GCS, which needs gcsfs (the exclusive writes of the evaluation identity): pip install 'iwae-pipeline[gcs]'")
        try:
            fs, base = pafs.FileSystem.from_uri(_with_env_endpoint(loc))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as e:
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

    def path(self, key: str = "") -> str:
        return f"{self.base}/{key}".rstrip("/") if key else self.base

    def uri(self, key: str = "") -> str:
        """The location of ``key`` as a user would type it (no query string)."""
        if self.is_local:
            return self.path(key)
        url = urlparse(self.location)
        return f"{url.scheme}://{self.path(key)}"

    def exists(self, key: str) -> bool:
        return self.fs.get_file_info(self.path(key)).type == pafs.FileType.File

    def read_bytes(self, key: str) -> bytes:
        """The whole object. ``FileNotFoundError`` when absent; ``OSError`` when it cannot be read now."""
        try:
            with self.fs.open_input_stream(self.path(key)) as f:
                return bytes(f.read())
        except FileNotFoundError:
            raise
        except OSError as e:
            if self.fs.get_file_info(self.path(key)).type == pafs.FileType.NotFound:
                raise FileNotFoundError(self.uri(key)) from None
            raise OSError(f"cannot read {self.uri(key)}: {str(e).splitlines()[0][:160]}") from None

    def list(self, prefix: str, suffix: str = "") -> list[str]:
        """Keys of the files below ``prefix`` (recursive, sorted), skipping ``_``/``.`` names."""
        sel = pafs.FileSelector(self.path(prefix), recursive=True, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(sel):
            if info.type != pafs.FileType.File or not info.path.endswith(suffix):
                continue
            key = info.path[len(self.base) + 1 :] if self.base else info.path
            if any(part.startswith(("_", ".")) for part in key.split("/")):
                continue
            out.append(key)
        return sorted(out)

    def read_table(self, key: str, schema: pa.Schema) -> pa.Table:
        """One Parquet file with the declared schema (raises ``pa.ArrowInvalid``/``OSError`` if damaged)."""
        return pq.read_table(pa.BufferReader(self.read_bytes(key)), schema=schema)

    # ------------------------------------------------------------------ writes

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a whole object atomically (temp name + rename locally, one PUT on object stores)."""
        if self.is_local:
            write_atomic(self.path(key), data)
            return
        with self.fs.open_output_stream(self.path(key)) as f:
            f.write(data)  # one call with the whole payload: nothing to complete half-way

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only where there is none; returns whether this call wrote it.

        Exclusive on a local disk (a hard link, :func:`iwae.files.create_atomic`), on S3 through S3's
        conditional PUT (``If-None-Match: *``; AWS since 2024, MinIO, moto) and on GCS through its
        create-only upload (``ifGenerationMatch=0``). pyarrow exposes neither, so they go through
        s3fs and gcsfs. Other object stores (or an S3 server that answers the header with 501) check
        and then write: there callers read the object back."""
        if self.is_local:
            return create_atomic(self.path(key), data)
        if self.exists(key):  # the common case in one HEAD; also all a server that ignores the header gets
            return False
        scheme = urlparse(self.location).scheme
        written: bool | None = None
        if scheme == "s3":
            written = _s3_put_if_absent(self.location, self.path(key), data)
        elif scheme in GCS_SCHEMES:
            written = _gcs_put_if_absent(self.location, self.path(key), data)
        if written is not None:
            return written
        self.write_bytes(key, data)
        return True

    def write_table(self, key: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(key, sink.getvalue().to_pybytes())

    def quarantine(self, key: str) -> str:
        """Move a damaged file aside (``_quarantine/<key>.<time>``), never delete it; returns where to."""
        dest = f"{QUARANTINE}/{key}.{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        if self.is_local:
            Path(self.path(dest)).parent.mkdir(parents=True, exist_ok=True)
        self.fs.move(self.path(key), self.path(dest))
        return self.uri(dest)

    def delete_dir(self, prefix: str) -> None:
        info = self.fs.get_file_info(self.path(prefix))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(prefix))

    def list_all(self) -> Keys:
        """Every key below this location, hidden names (``_``, ``.``) included, sorted."""
        sel = pafs.FileSelector(self.path(), recursive=True, allow_not_found=True)
        return sorted(i.path[len(self.base) + 1 :] for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File)

    def delete(self, key: str) -> None:
        """Delete one file (only the marker a command made, when it undoes its own start)."""
        self.fs.delete_file(self.path(key))

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
        return not self.fs.get_file_info(sel)

    def kind(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path()).type
