"""`score`: anyone's latent-variable model through the sharded evaluation, from a parsed request.

The command parses its options into a :class:`Request` and calls :func:`score`, which does the rest
in order: find and build the factory (twice: it must return the same weights each time, since every
node builds it), probe it on a few images, key it (name, weights digest, data), check the folder
that ships to the nodes, connect, check the storage, score the ranges left on the one executor
(:func:`pipeline.driver.score_model`), and summarise; images the model fails on are named (exit 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from iwae.evaluate import EvalConfig, binarize_by_id
from pipeline.errors import UserError
from pipeline.store.estimates import AISPlan, EvalPlan


@dataclass(frozen=True, kw_only=True)
class Request:
    """What `score` was asked (see ``iwae-pipeline score --help``)."""

    factory: str  # MODULE:FACTORY
    name: str | None
    data_spec: str  # "mnist" or a file of vectors
    binarize: bool | None  # None: for mnist yes, for a file no
    eval: EvalConfig
    test_images: int | None
    ais: AISPlan | None  # AIS or BDMC instead of importance sampling
    cpus: float
    gpus: float | None
    workers: int | None
    retries: int
    address: str | None
    results: str
    data_dir: str


def probe_images(pool: Any, binarize: bool, seed: int, ids: list[int] | None = None) -> torch.Tensor:
    """A few images as the scoring sees them (binarised by id where it binarises)."""
    ids = ids if ids is not None else list(range(min(4, len(pool))))
    x = torch.as_tensor(np.asarray(pool[ids]), dtype=torch.float32)
    return binarize_by_id(x, ids, seed) if binarize else x


def score(req: Request, echo: Callable[[str], None]) -> tuple[str, str]:
    """Score the request's model (module docstring). Returns the one-line summary, and the line that
    names the images the model gives no finite log p(x) on ("" when none: the rest are scored and
    kept either way; the command then exits 1)."""
    from pipeline import driver
    from pipeline import user_models as um
    from pipeline.datasource import DataSource
    from pipeline.shipping import left_out_line, plan
    from pipeline.store.results import Results

    root, target = um.locate(req.factory)
    name = um.check_name(req.name or um.default_name(req.factory))
    binarize = (req.data_spec == um.MNIST) if req.binarize is None else req.binarize
    data = DataSource.open(req.data_dir)
    if req.data_spec == um.MNIST:
        if driver.on_local_ray(req.address):
            data.check_here(um.MNIST)
        array = None
        pool = data.load(um.MNIST).test  # the probe's images here; the nodes read their own
    else:
        array = um.load_array(req.data_spec)
        pool = array
    if binarize and (pool.min() < 0 or pool.max() > 1):
        raise UserError(
            f"{req.data_spec} has values outside [0, 1] ({pool.min():g}..{pool.max():g}); --binarize draws 1[u < x]: scale it, or pass --no-binarize"
        )
    ec = req.eval
    est_plan: EvalPlan | AISPlan = req.ais if req.ais is not None else EvalPlan(ec, num_images=req.test_images or len(pool))
    n = est_plan.num_images
    bdmc = isinstance(est_plan, AISPlan) and est_plan.method == "bdmc"
    if not bdmc and n > len(pool):
        raise UserError(f"{req.data_spec} has {len(pool)} images; ask for at most that many (--test-images / --ais-images)")
    cpu = torch.device("cpu")
    model, digest = um.build(target, root, cpu)
    if um.build(target, root, cpu)[1] != digest:  # every node calls it: it must return the same weights each time
        raise UserError(f"{req.factory} returns other weights on each call; make it load saved weights (or seed it), so every node scores one model")
    um.probe(model, probe_images(pool, binarize, ec.seed))
    ref = um.ModelRef(req.factory, name, digest, um.data_tag(req.data_spec, binarize, array), target, root)
    likelihood = "density" if getattr(model, "continuous", False) else "probability"
    excludes: list[str] | None = None
    if not driver.on_local_ray(req.address):
        um.check_folder(root)  # shipped to the nodes: with the one exclude list, said in one line what stays behind
        excludes, left = plan(root)
        if left:
            echo(left_out_line(root, left))
    res = Results.open(req.results, create=True)
    with driver.ray_session(req.address, notice=echo, working_dir=root, excludes=excludes) as cluster:
        if cluster.shipped:
            ref = ref.shipped()  # the workers import it from the folder Ray gave them, not from this machine's disk
        driver.check_storage(cluster, res)
        written = driver.score_model(
            ref, req.data_spec, res, data, cluster, est_plan, binarize=binarize, likelihood=likelihood, images=None if array is None else array[:n],
            cpus=req.cpus, gpus=req.gpus, workers=req.workers, retries=req.retries, echo=echo,
        )  # fmt: skip
    failed = um.failed_images(res, est_plan, ref.key)
    line = summary(res, est_plan, ref, likelihood, written)
    if failed:
        first = failed[0]
        why = um.why_failed(model, probe_images(np.asarray(pool), binarize, ec.seed, [first]), first) if not bdmc else "a simulated image"
        ids = ", ".join(map(str, failed[:10])) + (", ..." if len(failed) > 10 else "")
        return line, (
            f"{ref.name} gives no finite log p(x) on {len(failed)} of {n} images (ids {ids}; image {first}: {why}); the other {n - len(failed)}"
            " are scored and reported; fix the model there and score it again (new weights are a new key)"
        )
    return line, ""


def summary(res: Any, est_plan: Any, ref: Any, likelihood: str, written: int) -> str:
    """One line: the model's mean NLL on the images scored, with its standard error."""
    from pipeline.report.stats import se
    from pipeline.user_models import model_rows

    df = model_rows(res, est_plan, ref.key).to_pandas()
    col = "log_px" if est_plan.table == "eval" else "log_px_ais"
    ok = df[np.isfinite(df[col].astype(float))]
    lp = ok[col]
    where = f"({written} scored now); rows in {res.store.uri(f'tables/{est_plan.table}/run_id={ref.key}')}"
    kind = "minus log density" if likelihood == "density" else "NLL"
    if est_plan.table == "bdmc":
        gap = ok.log_px_upper - ok.log_px_ais
        return (
            f"{ref.name} ({ref.key}) BDMC {est_plan.estimate} on {len(ok)} images simulated from it: {kind} between {-ok.log_px_upper.mean():.2f}"
            f" and {-lp.mean():.2f} nats, gap {gap.mean():.2f} ± {se(gap):.2f} {where}"
        )
    return f"{ref.name} ({ref.key}) {est_plan.table} {est_plan.estimate}: {kind} {-lp.mean():.2f} ± {se(lp):.2f} nats on {len(lp)} images {where}"
