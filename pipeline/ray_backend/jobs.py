"""Ray Jobs: submit ``iwae-pipeline sweep`` to a cluster from a laptop; status, logs, stop."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.errors import UserError
from pipeline.ray_backend.cluster import probe_address
from pipeline.shipping import ENVIRONMENTS, SECRETS


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


# what `submit` never uploads: the one exclude list (pipeline.shipping), and the project's data, docs and checkpoints
PROJECT_EXTRAS = ["data", "cache", "docs", "*.pt"]
UPLOAD_EXCLUDES = [*ENVIRONMENTS, *SECRETS, *PROJECT_EXTRAS]
ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


def project_root() -> Path:
    """The project's source tree, found from the package itself (not the current folder): what
    ``submit`` uploads as the job's working folder."""
    import pipeline

    root = Path(pipeline.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists() or not (root / "iwae").is_dir():
        raise UserError(
            f"submit uploads the project's source tree, and {root} is not one (an installed wheel); install the project"
            " from its checkout (`pip install -e .`) and submit from there"
        )
    return root


def submit(address: str, entrypoint: str, working_dir: Path, submission_id: str | None, env_vars: dict[str, str], excludes: list[str] | None = None) -> str:
    """Upload ``working_dir`` (less ``excludes``: :func:`pipeline.shipping.plan`'s, by default
    :data:`UPLOAD_EXCLUDES`) and run ``entrypoint`` on the cluster; returns the submission id."""
    client = job_client(address)
    runtime_env = {"working_dir": str(working_dir), "excludes": excludes or UPLOAD_EXCLUDES, "env_vars": env_vars}
    try:
        return str(client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id))
    except RuntimeError as e:
        if submission_id and "already exists" in str(e):
            raise UserError(f"a job with submission id {submission_id} already exists on {address}; pass a new --submission-id") from None
        raise UserError(f"the cluster refused the job ({' '.join(str(e).split())[:300]})") from None


def _asking(address: str, submission_id: str, call: Callable[[Any], Any]) -> Any:
    """One call of the Jobs API about a job: an unknown id, or a dashboard that stopped answering,
    each as its own one line."""
    client = job_client(address)  # an unreachable dashboard: one line already
    try:
        return call(client)
    except RuntimeError as e:
        text = " ".join(str(e).split())
        if "does not exist" in text or "404" in text or "not found" in text.lower():
            raise UserError(f"no job {submission_id} on {address}; list the jobs there with `ray job list --address {address}`") from None
        raise UserError(f"the Ray Jobs API at {address} failed ({text[:160]}); check that the cluster's dashboard is up") from None
    except (ConnectionError, OSError) as e:
        raise UserError(f"lost the Ray Jobs API at {address} ({type(e).__name__}); check that the cluster's dashboard is up") from None


def status(address: str, submission_id: str) -> str:
    return str(_asking(address, submission_id, lambda c: c.get_job_status(submission_id)))


def logs(address: str, submission_id: str, follow: bool, echo: Callable[[str], None]) -> None:
    if not follow:
        echo(_asking(address, submission_id, lambda c: c.get_job_logs(submission_id)))
        return
    import asyncio

    status(address, submission_id)  # an unknown id: one line before streaming

    async def tail(client: Any) -> None:
        async for chunk in client.tail_job_logs(submission_id):
            echo(chunk)

    _asking(address, submission_id, lambda c: asyncio.run(tail(c)))


def stop(address: str, submission_id: str) -> bool:
    return bool(_asking(address, submission_id, lambda c: c.stop_job(submission_id)))


def wait(address: str, submission_id: str, timeout: float | None = None) -> str:
    """Poll until the job ends (SUCCEEDED/FAILED/STOPPED), or until ``timeout`` seconds pass when one
    is given (then the job's current status)."""
    t0 = time.monotonic()
    while True:
        st = status(address, submission_id)
        if st.split(".")[-1] in ENDED or (timeout is not None and time.monotonic() - t0 > timeout):
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
