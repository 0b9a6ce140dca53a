"""The demo `make demo` runs: 1-layer MNIST, VAE against IWAE at k=5, the paper's schedule cut to its
first 2 stages (4 epochs), then k=5000 evaluation on the first 500 test images. About 5 minutes on 2 cores."""

from __future__ import annotations

from iwae.bounds import IWAE, VAE
from iwae.config import ModelConfig, RunConfig, ScheduleConfig
from iwae.evaluate import EvalConfig
from jobs import Job, cut, smoke_eval


def build(size: str = "full", stages: int | None = None, epoch_scale: float | None = None) -> Job:
    sched = ScheduleConfig(stages=2)
    runs = tuple(
        cut(RunConfig(dataset="mnist", model=ModelConfig.paper(1), objective=o, schedule=sched), size, stages, epoch_scale) for o in (VAE(k=5), IWAE(k=5))
    )
    return Job(
        name="demo",
        description="CPU demo: VAE vs IWAE (k=5), 4 epochs, k=5000 on 500 test images",
        runs=runs,
        eval=smoke_eval(EvalConfig(), size),
        test_images=500 if size == "full" else 20,
    )
