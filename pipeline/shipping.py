"""What travels to a cluster's nodes, for every command that ships a folder there (``submit``: the
project's source tree; ``score --address``: the folder of a user's model): one exclude list.

- :data:`ENVIRONMENTS`: virtual environments, version control, caches and results never travel;
- :data:`SECRETS`: anything that looks like a secret never travels (``.env`` files, cloud and SSH
  credentials, keys and certificates, ``*secret*``, ``*token*``), nor does a JSON file that holds a
  Google service account's private key, whatever its name;
- each command adds what it knows it does not need (``submit``: the data, docs and checkpoints).

Patterns are gitignore-style, matched with ``pathspec`` as Ray's runtime environment matches its
``excludes``, so :func:`plan` names exactly the files that stay behind, and the command says so in
one line. A folder's own ``.gitignore`` is not what decides: it often names the very weights a
model's factory loads (``*.pt``), which must travel (:mod:`pipeline.ray_backend.cluster` switches
Ray's ``.gitignore`` handling off for that one upload, and on again after).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pathspec

ENVIRONMENTS = [".venv", "venv", ".git", "**/__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".ipynb_checkpoints", "results"]
SECRETS = [
    ".env",
    ".env.*",
    "*.env",
    ".envrc",
    ".aws",
    ".ssh",
    ".gnupg",
    ".docker",
    ".kube",
    ".netrc",
    ".pgpass",
    ".git-credentials",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*credentials*",
    "*secret*",
    "*token*",
]
_SKIP_DIRS = {".venv", "venv", ".git", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".ipynb_checkpoints"}


def _service_account(path: Path) -> bool:
    """A JSON file holding a Google service account's key (its name says nothing)."""
    try:
        if path.stat().st_size > 64 * 1024:
            return False
        body = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(body, dict) and body.get("type") == "service_account" and "private_key" in body


def plan(root: str | Path, extra: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """The excludes for shipping ``root`` (Ray's ``excludes``), and the files under it that they leave
    out because they look like secrets (paths relative to ``root``, sorted)."""
    folder = Path(root)
    secrets = pathspec.PathSpec.from_lines("gitwildmatch", SECRETS)
    envs = pathspec.PathSpec.from_lines("gitwildmatch", [*ENVIRONMENTS, *extra])
    left: list[str] = []
    named: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = Path(dirpath).relative_to(folder)
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not envs.match_file(str(rel_dir / d) + "/")]
        for f in filenames:
            rel = str(rel_dir / f) if str(rel_dir) != "." else f
            if envs.match_file(rel):
                continue
            if secrets.match_file(rel):
                left.append(rel)
            elif f.endswith(".json") and _service_account(Path(dirpath) / f):
                left.append(rel)
                named.append(f"/{rel}")  # anchored: exactly this file
    return [*ENVIRONMENTS, *SECRETS, *extra, *named], sorted(left)


def left_out_line(root: str | Path, left: Sequence[str]) -> str:
    """One line saying what stays behind ("" when nothing that looks like a secret is there)."""
    if not left:
        return ""
    shown = ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
    return f"shipping {root} to the cluster without {len(left)} file(s) that look like secrets: {shown}"
