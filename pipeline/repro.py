"""`iwae-pipeline repro --minutes M`: the paper's Table 1 at k=50 on whatever device torch sees, in M minutes.

In-process (no Ray, no network; ``data/`` present). Within the budget it:

1. measures packed training on this device (``bench``'s packing figures, about a minute);
2. trains the k=50 pack (VAE and IWAE of one layer, each seed; with ``two_layer``, also the
   two-layer pair of the first seed, the paper's claim that the second layer keeps few active
   units) for as many whole stages of the paper's schedule as the measured step time fits into the
   time left, keeping room for the evaluation; the stage count is kept in ``repro.json`` so that a
   re-run resumes the same runs;
3. scores the first ``test_images`` test images (all 10,000 by default) with k=5000, and the
   first ``train_images`` training images for the train-test gap;
4. with ``ais_images``, AIS (:mod:`iwae.ais`) on the first of those test images, a convergence check
   at half the temperatures on up to 20 of them (does the estimate still move as T doubles?), and with ``bdmc_images`` the BDMC
   sandwich on images simulated from each model; the AIS cost per image on this device and on
   its CPU goes into the figures;
5. writes the tables, the report and ``repro.json`` (the figures, per-seed paired IWAE gains, the
   paper's numbers beside them, L_5000 against AIS per run) to the results location.

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

from iwae.ais import AISConfig
from iwae.bounds import IWAE, VAE
from iwae.config import ModelConfig, RunConfig, ScheduleConfig
from iwae.evaluate import EvalConfig
from iwae.pack import group_packs
from iwae.state import pick_device, training_images
from pipeline.bench import ais_cost, bench_packing, device_sync
from pipeline.datasource import DataSource
from pipeline.driver import evaluate_here
from pipeline.report import PAPER_TABLE1, ais_vs_lk, build_report, load
from pipeline.report.stats import paired
from pipeline.store.estimates import HEADLINE, AISPlan, EvalPlan
from pipeline.store.ledger import RunLedger
from pipeline.store.results import Results
from pipeline.work import train_members

REPRO_FILE = "repro.json"


def repro_runs(stages: int, seeds: list[int], train_subset: int | None = None, two_layer: bool = False) -> list[RunConfig]:
    """Table 1's k=50 cell, one layer: a VAE and an IWAE per seed, cut to the first ``stages`` stages;
    with ``two_layer``, then the two-layer VAE and IWAE of the first seed."""
    sched = ScheduleConfig(stages=stages)
    runs = [RunConfig(objective=obj, seed=s, schedule=sched, train_subset=train_subset) for s in seeds for obj in (VAE(k=50), IWAE(k=50))]
    if two_layer:
        two = ModelConfig.paper(2)
        runs += [RunConfig(model=two, objective=obj, seed=seeds[0], schedule=sched, train_subset=train_subset) for obj in (VAE(k=50), IWAE(k=50))]
    return runs


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
    two_layer: bool = False,
    ais_images: int = 0,
    bdmc_images: int = 0,
    ais_steps: int = 500,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the budgeted reproduction (module docstring); returns the figures written to ``repro.json``."""
    t_start = time.monotonic()
    deadline = t_start + 60.0 * minutes
    dev = pick_device()
    ds = data.load("mnist")
    x_train = training_images(repro_runs(1, seeds, train_subset)[0], ds, dev)
    saved = _read_json(results)
    fig: dict[str, Any] = {"device": _device_name(dev), "torch": torch.__version__, "minutes": minutes}
    quick = minutes < 5
    members = 2 * len(seeds)  # the one-layer pack; the two-layer pair trains as a pack of its own
    # on a GPU every member trains in one pack, so that pack is among the sizes timed
    sizes = tuple(sorted({g for g in (1, 2, 4, 8, 16) if g <= members} | {members})) if dev.type == "cuda" else (1, 2)
    echo(f"repro: {minutes:g} minutes on {fig['device']}; measuring packed training (k=50)")
    fig["bench"] = bench_packing(x_train[:20_000], dev, quick, echo, k=50, sizes=sizes)

    # the step time of the pack that will train, as the bench measured it
    size = members if dev.type == "cuda" else _best_cpu_pack(fig["bench"], sizes, members)
    step_s = size * 20 / fig["bench"][f"pack_k50_G{size}"]
    steps_per_epoch = x_train.shape[0] // 20
    epoch_s = step_s * steps_per_epoch * (math.ceil(members / size) + 1.5 * two_layer)  # a two-layer step: ~1.5 one-layer steps
    n_runs = members + 2 * two_layer
    eval_s = _eval_seconds(dev, n_runs * (2 * test_images + train_images), quick)  # the test images twice: the pruned models too
    if ais_images or bdmc_images:
        fig["ais_speed"] = _ais_speed(dev, ds, quick, echo)
        eval_s += n_runs * _ais_seconds(fig["ais_speed"]["device"], ais_images, bdmc_images, ais_steps)
    left = deadline - time.monotonic() - eval_s - 20.0  # 20 s for tables and the report
    if stages is None and saved.get("stages"):
        stages = int(saved["stages"])
        echo(f"repro: resuming the {stages}-stage runs of {results} (pass --stages to train another cut, or another --results)")
    elif stages is None:
        stages = stages_that_fit(left, epoch_s)
    cfgs = repro_runs(stages, seeds, train_subset, two_layer)
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
            "paper_k50": {f"{n}-layer": dict(zip(("vae_nll", "vae_active", "iwae_nll", "iwae_active"), PAPER_TABLE1[("mnist", n, 50)])) for n in (1, 2)},
        }
    )
    echo(
        f"repro: a step of the pack of {size} takes {1e3 * step_s:.2f} ms, an epoch of all {members} runs {epoch_s:.1f} s; "
        f"evaluation about {eval_s:.0f} s; training {stages} stage(s) = {epochs} of the paper's 3,280 epochs"
    )
    # what a later call must match to keep this call's figures: the runs and the images they are scored on
    fig["config"] = {
        "stages": stages,
        "seeds": seeds,
        "two_layer": two_layer,
        "train_subset": train_subset,
        "test_images": test_images,
        "train_images": train_images,
        "ais_images": ais_images,
        "bdmc_images": bdmc_images,
        "ais_steps": ais_steps,
    }
    if saved.get("config") == fig["config"]:  # a phase this call finds done keeps the time of the call that last worked on it
        fig.update({k: saved[k] for k in ("train_seconds", "eval_seconds", "ais_seconds", "ais_evaluations") if k in saved})
    else:
        saved = {}  # another cut or other images: nothing of the earlier call's figures describes these runs
    _write_json(results, {**saved, **fig})

    t_train = time.monotonic()
    todo = RunLedger.read(results, [c.run_id for c in cfgs]).todo(cfgs)
    for pack in group_packs(cfgs, size):  # a pack of one too: the loop whose step time was measured
        train_members(pack, results, data, dataset=ds, progress=True)
    if todo or "train_seconds" not in fig:
        fig["train_seconds"] = time.monotonic() - t_train
        _write_json(results, {**saved, **fig})  # each phase's figures are kept as it ends: a killed call loses only its own phase

    t_eval = time.monotonic()
    run_ids = [c.run_id for c in cfgs]
    scored = 0
    for plan in repro_plans(test_images, train_images):  # as a sweep scores them: the pruned models on test images only
        scored += evaluate_here(results, data, run_ids, plan, show=False)
    if scored or "eval_seconds" not in fig:
        fig["eval_seconds"] = time.monotonic() - t_eval
        _write_json(results, {**saved, **fig})
    if ais_images or bdmc_images:

        def save_ais(entries: list[dict[str, Any]]) -> None:
            fig["ais_evaluations"] = entries
            _write_json(results, {**saved, **fig})

        before = {(e["method"], e["setting"], e["images"]): e for e in fig.get("ais_evaluations", [])}
        fig["ais_evaluations"] = run_ais(results, data, run_ids, ais_images, bdmc_images, ais_steps, echo, before, save_ais)
        fig["ais_seconds"] = sum(e["seconds"] for e in fig["ais_evaluations"])
        fig["ais"] = ais_vs_l5000(results, cfgs, ais_steps)
    fig["runs"], fig["gains"] = table1_k50(results, cfgs)
    build_report(results, data=data)
    fig["total_seconds"] = time.monotonic() - t_start
    _write_json(results, fig)
    for r in fig["runs"]:
        units = f"{r['active']}" + (f"+{r['active_h2']}" if r["active_h2"] is not None else "")
        nll = f"{r['nll']:.2f} ± {r['nll_se']:.2f} ({r['test_images']} images)"
        echo(f"  {r['objective'].upper():4s} {r['layers']}-layer seed {r['seed']}: test NLL {nll}, active {units}")
    for s, g in fig["gains"].items():
        paper = PAPER_TABLE1[("mnist", 2 if s.endswith("2layer") else 1, 50)]
        echo(f"  IWAE gain, seed {s}: {g['gain']:+.2f} ± {g['se']:.2f} nats (paired); paper {paper[0] - paper[2]:+.2f} after 3,280 epochs")
    for a in fig.get("ais", {}).values():
        gap = f"AIS - L_{a['k']} {a['gap']:+.2f} ± {a['gap_se']:.2f}; BDMC gap {a['bdmc_gap']:+.3f}"
        echo(f"  {a['label']}: AIS NLL {a['nll_ais']:.2f}, L_{a['k']} {a['nll_lk']:.2f} on {a['images']} images: {gap}")
    ais_part = f", AIS and BDMC {fig['ais_seconds']:.0f} s" if "ais_seconds" in fig else ""
    echo(f"repro: done in {fig['total_seconds']:.0f} s (training {fig['train_seconds']:.0f} s, evaluation {fig['eval_seconds']:.0f} s{ais_part})")
    return fig


def repro_plans(test_images: int, train_images: int) -> list[EvalPlan]:
    """The k=5000 estimates ``repro`` scores, those a sweep scores: the test images, the pruned models
    on the same test images and draws, and the first training images (the train-test gap)."""
    cfg = EvalConfig(k=5000)
    plans = [EvalPlan(cfg, test_images), EvalPlan(cfg, test_images, pruned=True)] if test_images else []
    return plans + ([EvalPlan(cfg, train_images, images="train")] if train_images else [])


def run_ais(
    results: Results,
    data: DataSource,
    run_ids: list[str],
    ais_images: int,
    bdmc_images: int,
    steps: int,
    echo: Callable[[str], None],
    before: dict[tuple[str, str, int], dict[str, Any]] | None = None,
    save: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """AIS on the first ``ais_images`` test images at T=``steps`` and, on up to 20 of them, at T/2 (the
    estimate should stop moving as T doubles; the check costs a third of a pass at T, where one at 2T
    would cost two); BDMC on ``bdmc_images`` simulated images. Returns each plan's settings and wall
    time; a plan this call found already scored keeps its entry in ``before``. ``save`` gets the entries so
    far after each plan."""
    plans = []
    if ais_images:
        check = min(20, ais_images)
        plans.append(AISPlan(AISConfig(steps=steps), ais_images))
        plans.append(AISPlan(AISConfig(steps=max(1, steps // 2)), check))
    if bdmc_images:
        plans.append(AISPlan(AISConfig(steps=steps), bdmc_images, method="bdmc"))
    out: list[dict[str, Any]] = []
    for plan in plans:
        t0 = time.monotonic()
        rows = evaluate_here(results, data, run_ids, plan, show=False)
        entry = {"method": plan.method, "setting": plan.estimate, "images": plan.num_images, "runs": len(run_ids), "seconds": time.monotonic() - t0}
        entry = (before or {}).get((plan.method, plan.estimate, plan.num_images), entry) if not rows else entry
        out.append(entry)
        echo(
            f"repro: {plan.method} {plan.estimate} on {plan.num_images} images of {len(run_ids)} runs: {entry['seconds']:.0f} s"
            + ("" if rows else " (already scored)")
        )
        if save is not None:
            save(out)
    return out


def ais_vs_l5000(results: Results, cfgs: list[RunConfig], steps: int) -> dict[str, dict[str, Any]]:
    """Per run, on the images AIS at T=``steps`` scored (:func:`pipeline.report.ais_vs_lk`, the
    report's own figures, against the run's L_5000): AIS and L_5000 NLL, AIS - L_5000 (paired,
    positive: L_5000 understates log p(x)), the jackknife's prediction of it, and the BDMC gap
    (upper - lower) on simulated images."""
    loaded = load(results)
    main = AISPlan(AISConfig(steps=steps), 1).estimate  # the setting run_ais scores all images with
    out: dict[str, dict[str, Any]] = {}
    for c in cfgs:
        if not ((loaded.ais.run_id == c.run_id) & (loaded.ais.estimate == main)).any():  # a run AIS scored stays, even with no image paired
            continue
        r = ais_vs_lk(loaded, c.run_id, main)
        out[c.run_id] = {"label": f"{c.flat()['objective'].upper()} {len(c.model.latent)}-layer seed {c.seed}", **r}
    return out


def _ais_speed(dev: torch.device, ds: Any, quick: bool, echo: Callable[[str], None]) -> dict[str, Any]:
    """AIS cost per image per temperature (bench's figure) here, and on this machine's CPU when here is a GPU."""
    out: dict[str, Any] = {"device": ais_cost(dev, ds, quick, 0.0, images=(100 if dev.type == "cuda" else None))}
    if dev.type == "cuda":
        out["cpu"] = ais_cost(torch.device("cpu"), ds, quick, 0.0, images=100)  # the same batch as the GPU's
        out["cpu_threads"] = torch.get_num_threads()
        out["speedup"] = out["cpu"]["ais_s_per_image_per_temperature"] / out["device"]["ais_s_per_image_per_temperature"]
    per = {k: f"{1e3 * v['ais_s_per_image_per_temperature']:.2f} ms" for k, v in out.items() if isinstance(v, dict)}
    echo(f"repro: AIS per image per temperature (16 chains, 10 leapfrog): {per}" + (f"; {out['speedup']:.0f}x" if "speedup" in out else ""))
    return out


def _ais_seconds(speed: dict[str, float], ais_images: int, bdmc_images: int, steps: int) -> float:
    """A run's AIS plans in seconds (pilot 100 temperatures each; the check at T/2 on 20 images;
    BDMC's forward and reverse passes), from the measured cost per image per temperature."""
    per = speed["ais_s_per_image_per_temperature"]
    check = min(20, ais_images)
    temps = ais_images * (steps + 100) + check * (steps // 2 + 100) + bdmc_images * (2 * steps + 100)
    return per * temps


def table1_k50(results: Results, cfgs: list[RunConfig]) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Per run: test NLL, its standard error, active units (per layer); per seed: the paired IWAE gain
    (VAE NLL - IWAE NLL), keyed by the seed for one layer and ``"<seed>-2layer"`` for two."""
    ids = {c.run_id for c in cfgs}
    loaded = load(results)  # the one reader: L_5000 by name, each image once
    runs = loaded.summary[loaded.summary.run_id.isin(ids)]
    out = []
    for _, r in runs.sort_values(["layers", "seed", "objective"]).iterrows():
        g = loaded.values(r.run_id, HEADLINE)
        n = len(g)
        out.append(
            {
                "run_id": r.run_id,
                "objective": r.objective,
                "layers": int(r.layers),
                "seed": int(r.seed),
                "epochs": int(r.epochs),
                "test_images": n,
                "nll": float(-g.log_px.mean()) if n else math.nan,
                "nll_se": float(g.log_px.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
                "active": int(r.active_h1),
                "active_h2": None if pd.isna(r.active_h2) else int(r.active_h2),
                "train_seconds": float(r.train_seconds),
                "device": r.device,
            }
        )
    gains: dict[str, dict[str, float]] = {}
    for layers, seed in sorted({(len(c.model.latent), c.seed) for c in cfgs}):
        by = {c.flat()["objective"]: c.run_id for c in cfgs if c.seed == seed and len(c.model.latent) == layers}
        if "vae" in by and "iwae" in by:
            g = paired(loaded.log_px(by["vae"], HEADLINE), loaded.log_px(by["iwae"], HEADLINE))  # IWAE's log-likelihood minus the VAE's, image by image
            if g.n > 1:
                key = str(seed) if layers == 1 else f"{seed}-2layer"
                gains[key] = {"gain": g.mean, "se": g.se, "images": g.n}
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
