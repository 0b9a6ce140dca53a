"""Results locations written by hand: runs rows and estimate files with chosen numbers, read back
through the real reader and summary (pipeline.store.estimates, pipeline.report.summary)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from iwae.config import ModelConfig, RunConfig
from pipeline.store.estimates import Span
from pipeline.store.results import RUNS_SCHEMA, Results, read_schema, rows_table

L5000 = "k5000-seed123-block500"
AIS = "T500-C16-L10-P100-seed0"


def run(objective: str = "iwae", k: int = 5, seed: int = 0, layers: int = 1, **kw) -> RunConfig:
    """A run config by its usual knobs (``estimator``, ``train_subset``, ``init_from``, ``schedule``...)."""
    obj = {"name": objective, "k": k, **({"m": kw.pop("m")} if "m" in kw else {}), **({"beta": kw.pop("beta")} if "beta" in kw else {})}
    return RunConfig(objective=obj, seed=seed, model=ModelConfig.paper(layers), **kw)


def add_run(res: Results, cfg: RunConfig, active: int = 20, active_h2: int | None = None, status: str = "done", legacy: bool = False) -> str:
    """Write a runs-table row for ``cfg`` (``legacy``: without the config and cell columns)."""
    row = {
        **cfg.flat(),
        "label": cfg.label(),
        "config": None if legacy else json.dumps(cfg.to_dict(), sort_keys=True),
        "cell": None if legacy else cfg.cell_id,
        "status": status,
        "error": "",
        "active_h1": active,
        "active_h2": active_h2,
        "unit_var_h1": [1.0] * active,
        "train_seconds": 1.0,
    }
    res.store.write_table(res.row_key(cfg.run_id), rows_table([row], RUNS_SCHEMA))
    return cfg.run_id


def add_estimate(
    res: Results, run_id: str, values: dict[int, float], estimate: str = L5000, table: str = "eval", name: str | None = None, **cols: object
) -> None:
    """Write one estimate file of ``run_id``: ``values`` maps image id -> log p(x) (AIS: log_px_ais).
    ``name``: the file's name (default: the range file of those images); ``cols``: more columns. A
    file named otherwise, or with an earlier layout's column (``log_px_pruned``), goes where the
    earlier layout kept it (``tables/<table>/<run_id>/<estimate>/``, the run's id on every row)."""
    ids = sorted(values)
    ais = table in ("ais", "bdmc")
    base: dict[str, object] = {"run_id": run_id}
    if ais:
        base.update({"method": table, "ais_steps": int(estimate.split("-")[0][1:]), "ais_chains": 16, "ais_leapfrog": 10, "ais_seed": 0})
        base.update({"eval_seed": 123 if table == "ais" else None, "accept": 0.7, "seconds": 1.0})
    else:
        k = int(estimate.split("-")[0][1:])
        base.update({"eval_k": k, "eval_seed": 123, "eval_block": 500, "eval_pruned": estimate.endswith("-pruned")})
    rows = [
        {**base, "image_id": i, ("log_px_ais" if ais else "log_px"): v, **{c: (x[i] if isinstance(x, dict) else x) for c, x in cols.items()}}
        for i, v in values.items()
    ]
    legacy = name is not None or "log_px_pruned" in cols
    fname = name or Span(run_id, ids[0], ids[-1]).name
    folder = f"tables/{table}/{run_id}/{estimate}" if legacy else f"tables/{table}/run_id={run_id}/estimate={estimate}"
    res.store.write_table(f"{folder}/{fname}", rows_table(rows, read_schema(table)))


def seq(values: Sequence[float], start: int = 0) -> dict[int, float]:
    """Image ids ``start, start+1, ...`` mapped to ``values``."""
    return {start + i: float(v) for i, v in enumerate(values)}
