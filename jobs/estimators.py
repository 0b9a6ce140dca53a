"""Gradient estimators and later bounds at matched cost (50 samples per example), 1-layer MNIST:
IWAE k=50 with the standard, STL and DReG gradients; MIWAE(5,10), CIWAE(beta=0.5, k=50), PIWAE(5,10)."""

from __future__ import annotations

from iwae.bounds import CIWAE, IWAE, MIWAE, PIWAE, Objective
from iwae.config import Estimator, ModelConfig, RunConfig, ScheduleConfig
from iwae.evaluate import EvalConfig
from jobs import Job, cut, smoke_eval


def build(size: str = "full", stages: int | None = None, epoch_scale: float | None = None) -> Job:
    model = ModelConfig.paper(1)
    grid: list[tuple[Objective, Estimator]] = [(IWAE(k=50), est) for est in Estimator]
    grid += [(MIWAE(m=5, k=10), Estimator.standard), (CIWAE(k=50, beta=0.5), Estimator.standard), (PIWAE(m=5, k=10), Estimator.standard)]
    runs = tuple(cut(RunConfig(dataset="mnist", model=model, objective=o, estimator=e, schedule=ScheduleConfig()), size, stages, epoch_scale) for o, e in grid)
    return Job(
        name="estimators",
        description="IWAE k=50 standard/STL/DReG and MIWAE/CIWAE/PIWAE at matched cost (6 runs)",
        runs=runs,
        eval=smoke_eval(EvalConfig(), size),
        test_images=None if size == "full" else 20,
        pruned=False,
    )
