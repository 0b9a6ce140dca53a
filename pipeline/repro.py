"""`iwae-pipeline repro --minutes M`: the paper's Table 1 at k=50 on whatever device torch sees, in M minutes.

In-process (no Ray, no network; ``data/`` present). Within the budget it:

1. measures packed training on this device (``bench``'s packing figures, about a minute);
2. trains the k=50 pack (VAE and IWAE of one layer, each seed) for as many whole stages of the
   paper's schedule as the measured step time fits into the time left, keeping room for the
   evaluation; the stage count is kept in ``repro.json`` so that a re-run resumes the same runs;
3. scores the first ``test_images`` test images (all 10,000 by default) with k=5000, and the
   first ``train_images`` training images for the train-test gap;
4. writes the tables, the report and ``repro.json`` (the figures, per-seed paired IWAE gains, the
   paper's numbers beside them) to the results location.

``make repro`` is the other reproduction: every grid of the paper (Table 1's 36 runs, Table 2,
the estimators) on Ray, with a fixed 2-stage cut; this one trades breadth for depth.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch

from iwae.bounds import IWAE, VAE
from iwae.config import RunConfig, ScheduleConfig
from iwae.evaluate import EvalConfig
from iwae.pack import group_packs
from iwae.train import pick_device, training_images
from pipeline.bench import bench_packing, device_sync
from pipeline.datasource import DataSource
from pipeline.driver import evaluate_here
from pipeline.ledger import EvalPlan
from pipeline.report import build_report
from pipeline.results import Results
from pipeline.work import train_members

PAPER_K50 = {"vae": 86.35, "iwae": 84.78}  # Table 1, MNIST, one stochastic layer, k=50 (test NLL, nats)
REPRO_FILE = "repro.json"


def repro_runs(stages: int, seeds: list[int], train_subset: int | None = None) -> list[RunConfig]:
    """Table 1's k=50 cell, one layer: a VAE and an IWAE per seed, cut to the first ``stages`` stages."""
    return [
        RunConfig(objective=obj, seed=s, schedule=ScheduleConfig(stages=stages), train_subset=train_subset) for s in seeds for obj in (VAE(k=50), IWAE(k=50))
    ]


def stages_that_fit(seconds: float, epoch_seconds: float) -> int:
    """The most whole stages (3^i epochs each, i = 0..7) whose epochs take at most ``seconds``; at least 1."""
    done, epochs = 0, 0
    for i in range(8):
        epochs += 3**i
        if epochs * epoch_seconds > seconds:
            break
        done = i + 1
    return max(done, 1)


def run_repro(
    minutes: float,
    results: Results,
    data: DataSource,
    *,
    seeds: list[int],
    test_images: int,
    train_images: int,
    stages: int | None = None,
    train_subset: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the budgeted reproduction (module docstring); returns the figures written to ``repro.json``."""
    t_start = time.monotonic()
    deadline = t_start + 60.0 * minutes
    dev = pick_device()
    ds = data.load("mnist")
    x_train = training_images(repro_runs(1, seeds, train_subset)[0], ds, dev)
    saved = _read_json(results)
    fig: dict[str, Any] = {"device": _device_name(dev), "torch": torch.__version__, "minutes": minutes, "seeds": seeds}
    quick = minutes < 5
    members = 2 * len(seeds)
    # on a GPU every member trains in one pack, so that pack is among the sizes timed
    sizes = tuple(sorted({g for g in (1, 2, 4, 8, 16) if g <= members} | {members})) if dev.type == "cuda" else (1, 2)
    echo(f"repro: {minutes:g} minutes on {fig['device']}; measuring packed training (k=50)")
    fig["bench"] = bench_packing(x_train[:20_000], dev, quick, echo, k=50, sizes=sizes)

    # the step time of the pack that will train, as the bench measured it
    size = members if dev.type == "cuda" else _best_cpu_pack(fig["bench"], sizes, members)
    step_s = size * 20 / fig["bench"][f"pack_k50_G{size}"]
    steps_per_epoch = x_train.shape[0] // 20
    epoch_s = step_s * steps_per_epoch * math.ceil(members / size)
    eval_s = _eval_seconds(dev, members * (test_images + train_images), quick)
    left = deadline - time.monotonic() - eval_s - 20.0  # 20 s for tables and the report
    if stages is None and saved.get("stages"):
        stages = int(saved["stages"])
        echo(f"repro: resuming the {stages}-stage runs of {results} (pass --stages to train another cut, or another --results)")
    elif stages is None:
        stages = stages_that_fit(left, epoch_s)
    cfgs = repro_runs(stages, seeds, train_subset)
    epochs = cfgs[0].schedule.total_epochs
    fig.update(
        {
            "pack_size": size,
            "step_ms": 1e3 * step_s,
            "epoch_seconds_estimate": epoch_s,
            "eval_seconds_estimate": eval_s,
            "stages": stages,
            "epochs": epochs,
            "paper_epochs": 3280,
        }
    )
    echo(
        f"repro: a step of the pack of {size} takes {1e3 * step_s:.2f} ms, an epoch of all {members} runs {epoch_s:.1f} s; "
        f"evaluation about {eval_s:.0f} s; training {stages} stage(s) = {epochs} of the paper's 3,280 epochs"
    )
    _write_json(results, {**saved, "stages": stages, "seeds": seeds})

    t_train = time.monotonic()
    for pack in group_packs(cfgs, size):  # a pack of one too: the loop whose step time was measured
        train_members(pack, results, data, packed=True, dataset=ds, progress=True)
    fig["train_seconds"] = time.monotonic() - t_train

    t_eval = time.monotonic()
    run_ids = [c.run_id for c in cfgs]
    for images, n in (("test", test_images), ("train", train_images)):
        if n:
            plan = EvalPlan(EvalConfig(k=5000), num_images=n, shards=max(1, n // 500), images=images)
            evaluate_here(results, data, run_ids, plan, show=False)
    fig["eval_seconds"] = time.monotonic() - t_eval
    fig["runs"], fig["gains"] = table1_k50(results, cfgs)
    build_report(results)
    fig["total_seconds"] = time.monotonic() - t_start
    _write_json(results, {**fig, "stages": stages})
    for r in fig["runs"]:
        echo(f"  {r['objective'].upper():4s} seed {r['seed']}: test NLL {r['nll']:.2f} ± {r['nll_se']:.2f} ({r['test_images']} images), active {r['active']}")
    for s, g in fig["gains"].items():
        echo(f"  IWAE gain, seed {s}: {g['gain']:+.2f} ± {g['se']:.2f} nats (paired); paper {PAPER_K50['vae'] - PAPER_K50['iwae']:+.2f} after 3,280 epochs")
    echo(f"repro: done in {fig['total_seconds']:.0f} s (training {fig['train_seconds']:.0f} s, evaluation {fig['eval_seconds']:.0f} s)")
    return fig


def table1_k50(results: Results, cfgs: list[RunConfig]) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Per run: test NLL, its standard error, active units; per seed: the paired IWAE gain (VAE NLL - IWAE NLL)."""
    ids = {c.run_id for c in cfgs}
    runs = results.read("runs")
    runs = runs[runs.run_id.isin(ids)]
    ev = results.read("eval")
    ev = ev[ev.run_id.isin(ids) & (ev.eval_k == 5000)]
    out = []
    for _, r in runs.sort_values(["seed", "objective"]).iterrows():
        g = ev[ev.run_id == r.run_id]
        n = len(g)
        out.append(
            {
                "run_id": r.run_id,
                "objective": r.objective,
                "seed": int(r.seed),
                "epochs": int(r.epochs),
                "test_images": n,
                "nll": float(-g.log_px.mean()) if n else math.nan,
                "nll_se": float(g.log_px.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
                "active": int(r.active_h1),
                "train_seconds": float(r.train_seconds),
                "device": r.device,
            }
        )
    gains: dict[str, dict[str, float]] = {}
    for seed in sorted({c.seed for c in cfgs}):
        by = {c.flat()["objective"]: c.run_id for c in cfgs if c.seed == seed}
        v, i = ev[ev.run_id == by.get("vae")], ev[ev.run_id == by.get("iwae")]
        both = pd.merge(v[["image_id", "log_px"]], i[["image_id", "log_px"]], on="image_id", suffixes=("_vae", "_iwae"))
        if len(both) > 1:
            d = both.log_px_iwae - both.log_px_vae  # IWAE's log-likelihood minus the VAE's, image by image
            gains[str(seed)] = {"gain": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d))), "images": len(d)}
    return out, gains


def _best_cpu_pack(bench: dict[str, Any], sizes: tuple[int, ...], members: int) -> int:
    """The timed pack size with the highest total throughput on this CPU (1 unless a pack gains > 10%)."""
    best = max((g for g in sizes if g <= members), key=lambda g: bench[f"pack_k50_G{g}"])
    return best if bench[f"pack_k50_G{best}"] > 1.1 * bench["pack_k50_G1"] else 1


def _eval_seconds(dev: torch.device, images: int, quick: bool) -> float:
    """Seconds to score ``images`` images with k=5000 here, from a short timing (untrained model)."""
    from iwae.config import ModelConfig
    from iwae.evaluate import estimate_log_px
    from iwae.models import IWAEModel

    model = IWAEModel(ModelConfig.paper(1)).to(dev).eval()
    n = 4 if quick else (64 if dev.type == "cuda" else 8)
    x = (torch.rand(n, 784, device=dev) < 0.2).float()
    estimate_log_px(model, x, list(range(n)))  # warm-up (and compilation, where it applies)
    sync = device_sync(dev)
    sync()
    t0 = time.perf_counter()
    estimate_log_px(model, x, list(range(n)))
    sync()
    return 1.3 * images * (time.perf_counter() - t0) / n


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def _read_json(results: Results) -> dict[str, Any]:
    try:
        return dict(json.loads(results.store.read_bytes(REPRO_FILE)))
    except FileNotFoundError:
        return {}


def _write_json(results: Results, obj: dict[str, Any]) -> None:
    results.store.write_bytes(REPRO_FILE, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())
