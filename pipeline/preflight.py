"""The first second of a submitted job: can the cluster's python run the project at all?

``submit`` runs ``python -m pipeline.preflight && python -m pipeline.cli sweep ...`` on the cluster.
Only the standard library is imported at the top, so on a node whose python lacks the project's
dependencies this still runs, and says in one line what is missing and how to fix it, instead of
the job failing with a traceback deep in its log.
"""

from __future__ import annotations

import importlib
import sys

NEEDED = ("typer", "pyarrow", "pandas", "tqdm", "filelock", "torch", "ray")


def missing() -> list[str]:
    out = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError:
            out.append(name)
    return out


def main() -> int:
    gone = missing()
    if not gone:
        return 0
    print(
        f"error: the cluster's python ({sys.executable}) cannot import {', '.join(gone)}; install the project on every node"
        " (`pip install -e .` with the pinned ray and torch, as cluster.yaml's setup_commands do), or start Ray from the"
        " environment that has it (its bin/ first on PATH when you run `ray start`)",
        file=sys.stderr,
        flush=True,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
