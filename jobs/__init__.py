"""Experiment grids as plain values: each job is a function ``build(size, **cut) -> Job``.

``size`` is ``full`` (the experiment as described) or ``smoke`` (the same grid on a few hundred
training images and a handful of test images, for end-to-end tests). ``stages``/``epoch_scale``
cut the paper's schedule for CPU budgets; the cut is part of every run's config and id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from iwae.config import RunConfig
from iwae.evaluate import EvalConfig

SIZES = ("full", "smoke")


@dataclass(frozen=True)
class Job:
    name: str
    description: str
    runs: tuple[RunConfig, ...]
    eval: EvalConfig
    test_images: int | None  # None: the whole test set
    pruned: bool = True  # also evaluate the model with its inactive units removed
    train_images: int = 0  # also evaluate this many training images (the train-test gap)
    requires: tuple[str, ...] = ()  # jobs whose runs this one starts from

    def datasets(self) -> list[str]:
        return sorted({c.dataset for c in self.runs})

    def eval_sizes(self, dataset: str, test_images: int | None = None, train_images: int | None = None) -> list[tuple[str, int, bool]]:
        """What its evaluation on ``dataset`` scores: ``(images, count, pruned)`` for the test images
        (the job's count, or the whole test set: MNIST 10,000, Omniglot 8,070) and, when asked, the
        first training images (the train-test gap); the options override the job's counts."""
        from iwae.data import TEST_SIZES

        n_train = self.train_images if train_images is None else train_images
        out = [("test", test_images or self.test_images or TEST_SIZES[dataset], self.pruned)]
        return out + ([("train", n_train, False)] if n_train else [])


def cut(cfg: RunConfig, size: str, stages: int | None, epoch_scale: float | None) -> RunConfig:
    """Apply the smoke size and a schedule cut to one run config."""
    sched = cfg.schedule
    if stages is not None or epoch_scale is not None:
        sched = replace(sched, stages=stages or sched.stages, epoch_scale=epoch_scale or sched.epoch_scale)
    if size == "smoke":
        sched = replace(sched, stages=2, epoch_scale=1.0) if sched.epochs is None else replace(sched, epochs=2)
        return replace(cfg, schedule=sched, train_subset=400)
    return replace(cfg, schedule=sched)


def smoke_eval(job_eval: EvalConfig, size: str) -> EvalConfig:
    return EvalConfig(k=100, seed=job_eval.seed, block=50, prefixes=(1, 5, 50, 100)) if size == "smoke" else job_eval


def select(job: Job, where: list[str]) -> Job:
    """Keep the runs whose flat config matches every ``KEY=VALUE`` (compared as text; ``KEY=A,B``
    matches either)."""
    if not where:
        return job
    cols = job.runs[0].flat().keys() if job.runs else ()
    conds = []
    for w in where:
        key, sep, value = w.partition("=")
        if not sep or key not in cols:
            raise ValueError(f"--where {w!r}: use KEY=VALUE with KEY one of {', '.join(cols)}")
        conds.append((key, set(value.split(","))))
    runs = tuple(r for r in job.runs if all(str(r.flat()[k]) in vs for k, vs in conds))
    if not runs:
        raise ValueError(f"--where {' '.join(where)} keeps none of {job.name}'s {len(job.runs)} runs; see `iwae-pipeline jobs`")
    return replace(job, runs=runs)


def registry() -> dict[str, Callable[..., Job]]:
    import functools

    from jobs import demo, estimators, paper_table1, paper_table2, scale

    return {
        "demo": demo.build,
        "paper_table1": paper_table1.build,
        "paper_table2": paper_table2.build,
        "estimators": estimators.build,
        **{f"scale_{n}": functools.partial(scale.build, n) for n in (200, 2000)},  # `bench --scale`
    }


def build(name: str, size: str = "full", stages: int | None = None, epoch_scale: float | None = None) -> Job:
    reg = registry()
    if name not in reg:
        raise KeyError(name)
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}")
    return reg[name](size=size, stages=stages, epoch_scale=epoch_scale)
