"""Ray Jobs: submit ``iwae-pipeline sweep`` to a cluster from a laptop; status, logs, stop."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.errors import UserError
from pipeline.ray_backend.cluster import probe_address


def job_client(address: str) -> Any:
    """A ``JobSubmissionClient``; token auth (default in Ray 2.60) is sent when configured.

    The token comes from ``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``/``~/.ray/auth_token`` with
    ``RAY_AUTH_MODE=token``; it is never printed or logged here.
    """
    import logging

    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray").setLevel(logging.WARNING)  # Ray logs a line per ignored file on upload
    probe_address(_dashboard_hostport(address))
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # Ray raises ConnectionError/RuntimeError with long text
        msg = str(e).splitlines()[0][:160]
        hint = (
            "set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN)"
            if "auth" in msg.lower() or "401" in msg
            else "check --address (http://HEAD:8265)"
        )
        raise UserError(f"cannot reach the Ray Jobs API at {address} ({msg}); {hint}") from None


def _dashboard_hostport(address: str) -> str:
    url = urlparse(address if "://" in address else f"http://{address}")
    return f"{url.hostname}:{url.port or 8265}"


def submit(address: str, entrypoint: str, working_dir: Path, submission_id: str | None, env_vars: dict[str, str]) -> str:
    """Upload ``working_dir`` and run ``entrypoint`` on the cluster; returns the submission id."""
    client = job_client(address)
    runtime_env = {
        "working_dir": str(working_dir),
        "excludes": [".venv", ".git", "data", "results", "cache", "docs", "**/__pycache__", "*.pt"],
        "env_vars": env_vars,
    }
    try:
        return str(client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id))
    except RuntimeError as e:
        if submission_id and "already exists" in str(e):
            raise UserError(f"a job with submission id {submission_id} already exists on {address}; pass a new --submission-id") from None
        raise UserError(f"the cluster refused the job ({' '.join(str(e).split())[:300]})") from None


def status(address: str, submission_id: str) -> str:
    client = job_client(address)
    try:
        return str(client.get_job_status(submission_id))
    except RuntimeError as e:
        raise UserError(f"no job {submission_id} on {address} ({str(e).splitlines()[0][:100]}); list jobs with `ray job list`") from None


def logs(address: str, submission_id: str, follow: bool, echo: Callable[[str], None]) -> None:
    client = job_client(address)
    if not follow:
        echo(client.get_job_logs(submission_id))
        return
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            echo(chunk)

    asyncio.run(tail())


def stop(address: str, submission_id: str) -> bool:
    return bool(job_client(address).stop_job(submission_id))


def wait(address: str, submission_id: str, timeout: float) -> str:
    """Poll until the job ends (SUCCEEDED/FAILED/STOPPED) or ``timeout`` seconds pass."""
    t0 = time.monotonic()
    while True:
        st = status(address, submission_id)
        if st.split(".")[-1] in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() - t0 > timeout:
            return st
        time.sleep(2)


def last_error(address: str, submission_id: str) -> str:
    """The last ``error: ...`` line the job printed (our one-line errors), without the prefix; '' if none."""
    try:
        text = job_client(address).get_job_logs(submission_id)
    except Exception:  # noqa: BLE001  # the logs are a courtesy here; the status already says it failed
        return ""
    lines = [ln.strip()[len("error:") :].strip() for ln in str(text).splitlines() if ln.strip().startswith("error:")]
    return lines[-1][:400] if lines else ""
