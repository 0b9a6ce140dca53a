"""Storage errors, classified once, and the one retry rule every store call goes through.

Object stores throttle by design and networks drop connections: a request that fails for such a
reason is *transient* and is tried again. The clients retry first (pyarrow's
``AwsStandardS3RetryStrategy``, botocore's ``adaptive`` mode for s3fs, see
:mod:`pipeline.store.objects`); what still escapes them is retried here with exponential backoff
and full jitter, for up to ``IWAE_STORE_RETRY_SECONDS`` (120 s). A store that keeps failing past that
raises :class:`StoreFailing`, which names it as failing (never as missing credentials), so the
executor retries the unit again later and a command that cannot go on says so, exit 1.

A *permanent* error (access denied, bad or missing credentials, no such bucket, a read-only or full
local disk) is never retried: :class:`StoreDenied`, one line naming the fix, exit 2.

``FileNotFoundError`` of a key is an answer, not an error: callers get it as it is.
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

from pipeline.errors import UserError

T = TypeVar("T")
RETRY_SECONDS = float(os.environ.get("IWAE_STORE_RETRY_SECONDS", "120"))
BACKOFF_FIRST_S, BACKOFF_CAP_S = 0.25, 15.0

# the error codes S3, GCS and their clients give for a request that can never succeed as it is
_PERMANENT_CODES = (
    "ACCESS_DENIED",
    "AccessDenied",
    "HTTP status 403",
    "HTTP status 401",
    "403 Forbidden",
    "Forbidden",
    "INVALID_ACCESS_KEY_ID",
    "InvalidAccessKeyId",
    "SIGNATURE_DOES_NOT_MATCH",
    "SignatureDoesNotMatch",
    "NO_SUCH_BUCKET",
    "NoSuchBucket",
    "bucket does not exist",
    "InvalidBucketName",
    "ExpiredToken",
    "Unable to locate credentials",
    "NoCredentialsError",
    "DefaultCredentialsError",
)
_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}


class StoreDenied(UserError):
    """A request the store refuses for good (credentials, permissions, no such bucket): exit 2."""


class StoreFailing(OSError):
    """Transient errors that went on past the retry bound: the store is failing now (not refusing)."""


def _text(e: BaseException) -> str:
    parts, seen = [], set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:  # the client's own error is often the cause
        seen.add(id(cur))
        parts.append(f"{type(cur).__name__}: {cur}")
        cur = cur.__cause__ or cur.__context__
    return " | ".join(parts)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def permanent(e: BaseException) -> bool:
    """A storage error that retrying cannot cure (see the module docstring)."""
    if isinstance(e, StoreDenied | PermissionError):
        return True
    if isinstance(e, FileNotFoundError):
        return any(c in _text(e) for c in ("NoSuchBucket", "NO_SUCH_BUCKET", "bucket does not exist"))
    if isinstance(e, OSError) and e.errno in _PERMANENT_ERRNOS and not isinstance(e, StoreFailing):
        return True
    text = _text(e)
    return any(c in text for c in _PERMANENT_CODES)


def transient(e: BaseException) -> bool:
    """An error worth trying again: anything a storage client raises that is not permanent (5xx,
    throttling, resets, timeouts, a dropped connection, the client's own connection errors)."""
    if not isinstance(e, Exception) or isinstance(e, FileNotFoundError | FileExistsError | StoreFailing) or permanent(e):
        return False  # a KeyboardInterrupt or a cancelled coroutine is never retried
    if isinstance(e, OSError | TimeoutError | ConnectionError):
        return True
    mod = type(e).__module__.split(".")[0]
    return mod in ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google", "gcsfs", "asyncio")


def denied(e: BaseException, where: str) -> StoreDenied:
    """A permanent error as the one line a user sees."""
    if isinstance(e, StoreDenied):
        return e
    if "://" not in where:  # a local folder: its permissions or its disk
        return StoreDenied(f"{where} cannot be used ({first_line(e)[:160]}); pass --results (or --data-dir) with a writable folder")
    return StoreDenied(
        f"{where} refuses this request ({first_line(e)[:160]}); give this node (and every node) credentials for it (environment or IAM role),"
        " or check the bucket's name and permissions"
    )


def retrying(call: Callable[[], T], what: str, deadline_s: float | None = None, sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, tried again on transient errors with exponential backoff and full jitter (AWS's
    "exponential backoff and jitter") for up to ``deadline_s`` seconds; a permanent error is raised at
    once as :class:`StoreDenied`. ``what`` names the request in messages."""
    limit = RETRY_SECONDS if deadline_s is None else deadline_s
    t0 = time.monotonic()
    attempt = 0
    while True:
        try:
            return call()
        except BaseException as e:  # noqa: BLE001  # classified below; anything else goes on as it is
            if isinstance(e, FileNotFoundError | FileExistsError) and not permanent(e):
                raise
            if permanent(e):
                raise denied(e, what) from None
            if not transient(e):
                raise
            attempt += 1
            waited = time.monotonic() - t0
            if waited >= limit:
                raise StoreFailing(
                    f"{what}: the store kept failing for {waited:.0f} s ({attempt} tries; last: {first_line(e)[:160]}); it is failing now, not"
                    " refusing: run the same command again later (IWAE_STORE_RETRY_SECONDS sets the wait)"
                ) from None
            pause = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2**attempt))
            sleep(min(pause, max(0.0, limit - waited)))
