"""Table 2 of Burda et al. 2016: the objective swap on 1-layer MNIST. The VAE (k=1) continues as
IWAE k=50 and the IWAE k=50 continues as VAE k=1, each from its Table 1 checkpoint (model and Adam
state), for 3^7 more epochs at lr 1e-4 (authors' experiments.py:experiment2)."""

from __future__ import annotations

from dataclasses import replace

from iwae.config import ModelConfig, RunConfig, ScheduleConfig
from iwae.evaluate import EvalConfig
from jobs import Job, cut, smoke_eval


def build(size: str = "full", stages: int | None = None, epoch_scale: float | None = None) -> Job:
    base = RunConfig(dataset="mnist", model=ModelConfig.paper(1))
    vae = cut(replace(base, objective={"name": "vae", "k": 1}), size, stages, epoch_scale)
    iwae50 = cut(replace(base, objective={"name": "iwae", "k": 50}), size, stages, epoch_scale)
    extra = max(1, round(3**7 * (epoch_scale or 1.0)))
    second = ScheduleConfig(epochs=extra, lr=1e-4)
    runs = (
        cut(replace(vae, objective={"name": "iwae", "k": 50}, schedule=second, init_from=vae.run_id), size, None, None),
        cut(replace(iwae50, objective={"name": "vae", "k": 1}, schedule=second, init_from=iwae50.run_id), size, None, None),
    )
    return Job(
        name="paper_table2",
        description="Table 2: VAE->IWAE(k=50) and IWAE(k=50)->VAE from Table 1's 1-layer MNIST models",
        runs=runs,
        eval=smoke_eval(EvalConfig(), size),
        test_images=None if size == "full" else 20,
        requires=("paper_table1",),
    )
