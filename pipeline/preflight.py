"""The first second of a submitted job: can the cluster's python run the project at all?

``submit`` runs ``python3 -m pipeline.preflight && python3 -m pipeline.cli sweep ...`` on the cluster
(python3: what cluster.yaml installs the project into). Only the standard library is imported, so
on a node whose python lacks the project or any of its runtime dependencies (read from the
project's own metadata, not a hand-kept list) this still runs, and says in one line what is missing
and how to fix it, instead of the job training for hours and failing in the report.
"""

from __future__ import annotations

import sys

PROJECT = "iwae-pipeline"


def requirements() -> list[str]:
    """The distributions the project needs at run time, from its own installed metadata (extras left out)."""
    from importlib import metadata

    out = []
    for req in metadata.requires(PROJECT) or []:
        if "extra ==" in req.replace('"', "").replace("'", ""):
            continue  # dev, bench, gcs: not needed to run a sweep
        name = req.split(";")[0]
        for sep in "[<>=!~ ":
            name = name.split(sep)[0]
        out.append(name.strip())
    return out


def missing() -> list[str]:
    """What the cluster's python lacks: the project itself, or any of its runtime dependencies."""
    from importlib import metadata

    try:
        needed = requirements()
    except metadata.PackageNotFoundError:
        return [PROJECT]
    out = []
    for name in needed:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def main() -> int:
    gone = missing()
    if not gone:
        return 0
    print(
        f"error: the cluster's python ({sys.executable}) lacks {', '.join(gone)}; install the project on every node"
        " (`pip install -e .` with the pinned ray and torch, as cluster.yaml's setup_commands do), or start Ray from the"
        " environment that has it (its bin/ first on PATH when you run `ray start`)",
        file=sys.stderr,
        flush=True,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
