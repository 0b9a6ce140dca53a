"""``python -m pipeline``: the CLI without installing the project (a GPU machine with torch but no .venv)."""

from pipeline.cli import run

run()
