"""The scale benchmark's grids (`iwae-pipeline bench --scale`): N tiny real runs, so that what is
measured is the control plane (leases, listings, the executor, the reader, the report), not the
arithmetic. Each run is a real run of the one training loop and the one evaluator: a model of a few
units (784-4-2), one epoch of one step on the first 20 training images, then L_10 on the first
1,000 test images (two fixed ranges). Half the runs are VAEs and half IWAEs (k=2), one seed each."""

from __future__ import annotations

from iwae.bounds import IWAE, VAE
from iwae.config import ModelConfig, RunConfig, ScheduleConfig
from iwae.evaluate import EvalConfig
from jobs import Job, cut

TINY = ModelConfig(latent=(2,), hidden_q=((4,),), hidden_p=((4,),))


def build(runs: int, size: str = "full", stages: int | None = None, epoch_scale: float | None = None) -> Job:
    sched = ScheduleConfig(epochs=1, lr=1e-3)
    grid = tuple(
        cut(RunConfig(dataset="mnist", model=TINY, objective=o, schedule=sched, seed=s, train_subset=20, num_active_examples=20), size, stages, epoch_scale)
        for s in range(runs // 2)
        for o in (VAE(k=2), IWAE(k=2))
    )
    return Job(
        name=f"scale_{runs}",
        description=f"scale benchmark: {runs} tiny runs (784-4-2, one step), L_10 on 1,000 test images each",
        runs=grid,
        eval=EvalConfig(k=10, block=10, prefixes=(1, 5, 10)),
        test_images=1000 if size == "full" else 20,
        pruned=False,
    )
