"""Table 2 of Burda et al. 2016: the objective swap on 1-layer MNIST. The VAE (k=1) continues as
IWAE k=50 and the IWAE k=50 continues as VAE k=1, each from its Table 1 checkpoint (model and Adam
state), for 3^7 more epochs at lr 1e-4 (authors' experiments.py:experiment2). 3^7 is the length of
the last of Table 1's 8 stages, so a schedule cut to its first N stages continues for the length of
its own last stage, 3^(N-1) (times ``epoch_scale``): the same ratio of extra to first-phase epochs.

Controls (not in the paper): each model also continues with its own objective for the same epochs
at the same rate. On a cut schedule the models are far from converged and any further training
helps, so the effect of the swap is the paired difference between a swap and its control."""

from __future__ import annotations

from dataclasses import replace

from iwae.bounds import IWAE, VAE
from iwae.config import ModelConfig, RunConfig, ScheduleConfig
from iwae.evaluate import EvalConfig
from jobs import Job, cut, smoke_eval


def build(size: str = "full", stages: int | None = None, epoch_scale: float | None = None) -> Job:
    base = RunConfig(dataset="mnist", model=ModelConfig.paper(1))
    vae = cut(replace(base, objective=VAE(k=1)), size, stages, epoch_scale)
    iwae50 = cut(replace(base, objective=IWAE(k=50)), size, stages, epoch_scale)
    extra = vae.schedule.plan()[-1][0]  # epochs of the last stage Table 1 ran (smoke: cut() sets 2)
    second = ScheduleConfig(epochs=extra, lr=1e-4)
    runs = tuple(
        cut(replace(src, objective=obj, schedule=second, init_from=src.run_id), size, None, None)
        for src, obj in (
            (vae, IWAE(k=50)),
            (iwae50, VAE(k=1)),
            (vae, vae.objective),  # controls: the same objective, continued
            (iwae50, iwae50.objective),
        )
    )
    return Job(
        name="paper_table2",
        description="Table 2: VAE->IWAE(k=50) and IWAE(k=50)->VAE from Table 1's 1-layer MNIST models, and both continued unswapped",
        runs=runs,
        eval=smoke_eval(EvalConfig(), size),
        test_images=None if size == "full" else 20,
        pruned=False,  # the paper's Table 2 gives NLL and active units only
        requires=("paper_table1",),
    )
