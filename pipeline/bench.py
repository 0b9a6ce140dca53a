"""`iwae-pipeline bench`: throughput of training and k=5000 evaluation on this machine.

Everything is measured in one run so the ratios compare like with like: warm-up first, then
repeats, medians reported. Figures:

- the fp32 matmul peak (GFLOP/s) of this device;
- training examples/s at batch 20, 1-layer paper model at k = 1, 5, 50 (and 2-layer at k=5), ours
  and Pyro's ``RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True)`` on the same
  architecture and data, and the ratio;
- k=5000 evaluation: decoded samples/s and images/s, the FLOPs per decoded sample, the roofline they
  imply (peak / FLOPs per sample), our fraction of it; the same work through the Ray-sharded path
  (Ray start-up excluded) and the ratio; the peak resident memory of an evaluation process;
- packing (:mod:`iwae.pack`): total and per-model training examples/s of a pack of G = 1, 2, 4, 8,
  16 k-sample runs, and on a GPU the step replayed as a CUDA graph against the eager one. Packs are
  timed after a few hundred training steps, not from a fresh model: a fresh model hides the
  subnormal floats that training produces; the CPU figures include the step with and without
  flushing them;
- the operators one training step runs (:func:`step_operators`): every aten operator that reaches
  the dispatcher during one eager step of a pack of one and of two (k=50), counted by a dispatch
  mode, the number a GPU launches as kernels before fusion.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from iwae.bounds import IWAE
from iwae.config import ModelConfig, RunConfig, ScheduleConfig
from iwae.data import binarize
from iwae.models import IWAEModel
from iwae.pack import Pack
from iwae.state import pick_device
from pipeline.datasource import DataSource


def median_time(fn: Callable[[], None], repeats: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_sync(dev: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)


def matmul_peak(dev: torch.device, quick: bool) -> float:
    """fp32 GFLOP/s of a large square matmul (the device's practical peak)."""
    n = 1024 if quick else 2048
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    reps = 3 if quick else 10
    for _ in range(2):
        a @ b

    def run() -> None:
        for _ in range(reps):
            a @ b

    t = median_time(run, 3, device_sync(dev))
    return 2 * n**3 * reps / t / 1e9


def decoder_flops(cfg: ModelConfig) -> int:
    """FLOPs of scoring one sample at evaluation: the decoder's matmuls, plus q(h_l|h_{l-1}) for l > 1."""
    macs = 0
    dims = (cfg.x_dim, *cfg.latent)
    for i in range(len(cfg.latent)):
        # p(h_i | h_{i+1}) (p(x | h1) for i = 0): widths dims[i+1] -> hidden_p[i] -> dims[i] (x2 for Gaussian heads)
        widths = [dims[i + 1], *cfg.hidden_p[i]]
        macs += sum(a * b for a, b in zip(widths, widths[1:])) + widths[-1] * dims[i] * (1 if i == 0 else 2)
        if i > 0:  # q(h_{i+1} | h_i) runs per sample too
            widths = [dims[i], *cfg.hidden_q[i]]
            macs += sum(a * b for a, b in zip(widths, widths[1:])) + widths[-1] * dims[i + 1] * 2
    return 2 * macs


def train_throughput(
    model_cfg: ModelConfig, k: int, data: torch.Tensor, dev: torch.device, steps: int, repeats: int, compiled: bool = False, warm: int | None = None
) -> float:
    """Our training step for one run (the code `train` runs: a pack of one, eager or compiled):
    examples/s at batch 20."""
    pack = Pack.fresh([RunConfig(model=model_cfg, objective=IWAE(k=k))], data.to(dev), graph=dev.type == "cuda", compile_step=compiled)
    pack.run_steps(pack.epoch_orders(), 0, max(5, steps // 5) if warm is None else warm)
    return pack.examples_per_s(steps, repeats)


def step_operators(x: torch.Tensor, size: int = 1, k: int = 50, warm: int = 3) -> dict[str, Any]:
    """The aten operators of one eager training step (forward, backward, Adam, the draws) of a pack of
    ``size`` k-sample runs on the CPU, as a dispatch mode sees them: ``total``, ``views``, and the ten
    most frequent ``(name, count)``. The count does not depend on the device; on a GPU each one is
    (at least) one kernel launch unless fused."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter[str] = Counter()
    views = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            counts[func.overloadpacket.__name__] += 1
            views[0] += bool(getattr(func, "is_view", False))
            return func(*args, **(kwargs or {}))

    pack = Pack.fresh([RunConfig(model=ModelConfig.paper(1), objective=IWAE(k=k), seed=s) for s in range(size)], x[:2000].cpu(), graph=False)
    orders = pack.epoch_orders()
    pack.run_steps(orders, 0, warm)
    with Count():
        pack.run_steps(orders, warm, 1)
    return {"total": sum(counts.values()), "views": views[0], "top": counts.most_common(10)}


def graph_kernels(model_cfg: ModelConfig, k: int, size: int, x: torch.Tensor, dev: torch.device) -> int:
    """The GPU kernels one replayed training step launches, the random draws outside the graph
    included (torch.profiler's CUDA activity); -1 where the profiler cannot say."""
    from torch.profiler import ProfilerActivity, profile

    try:
        pack = warm_pack(model_cfg, k, size, x, dev, True, 3)
        orders = pack.epoch_orders()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            pack.run_steps(orders, 3, 1)
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # noqa: BLE001  # a profiler without CUDA support (CUPTI): the figure is missing, the window goes on
        return -1


def warm_pack(model_cfg: ModelConfig, k: int, size: int, x: torch.Tensor, dev: torch.device, graph: bool, warm_steps: int) -> Pack:
    """A pack of ``size`` k-sample IWAE runs (seeds 0..size-1) on ``x``, trained ``warm_steps`` steps."""
    pack = Pack.fresh([RunConfig(model=model_cfg, objective=IWAE(k=k), seed=s) for s in range(size)], x.to(dev), graph=graph)
    pack.run_steps(pack.epoch_orders(), 0, warm_steps)
    return pack


def bench_packing(
    x: torch.Tensor, dev: torch.device, quick: bool, echo: Callable[[str], None], k: int = 50, sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
) -> dict[str, Any]:
    """Packing figures for the 1-layer paper model at ``k``: ``pack_G{G}`` (total examples/s) per size,
    the graphed/eager ratio on a GPU, and on a CPU the solo step with subnormals flushed and not."""
    fig: dict[str, Any] = {}
    mcfg = ModelConfig.paper(1)
    cuda = dev.type == "cuda"
    warm = 20 if quick else 300  # the subnormals appear after a few hundred steps (see iwae.train.train)
    base_steps = 10 if quick else (400 if cuda else 60)
    repeats = 2 if quick else 3
    torch.set_flush_denormal(True)
    for g in (1, 2):
        ops = step_operators(x, g, k)
        fig[f"step_ops_k{k}_G{g}"], fig[f"step_views_k{k}_G{g}"] = ops["total"], ops["views"]
        top = ", ".join(f"{n} {c}" for n, c in ops["top"][:6])
        line = f"operators in one eager training step, 1-layer k={k}, pack of {g}: {ops['total']} ({ops['views']} views; {top})"
        if cuda:
            kernels = graph_kernels(mcfg, k, g, x, dev)
            fig[f"graph_kernels_k{k}_G{g}"] = kernels
            line += f"; GPU kernels in one graphed step: {kernels}"
        echo(line)
    echo(f"packed training, 1-layer k={k}, examples/s at batch 20 per member (after {warm} warm-up steps):")
    for g in sizes:
        steps = max(5, base_steps // (1 if cuda else g))
        total = warm_pack(mcfg, k, g, x, dev, cuda, warm).examples_per_s(steps, repeats)
        fig[f"pack_k{k}_G{g}"] = total
        line = f"  G={g:<3d} total {total:9.0f}   per model {total / g:8.0f}   x{total / fig[f'pack_k{k}_G1']:.2f} of G=1"
        if cuda and g in (1, 8):
            eager = warm_pack(mcfg, k, g, x, dev, False, warm).examples_per_s(steps, repeats)
            fig[f"pack_k{k}_G{g}_eager"] = eager
            fig[f"pack_k{k}_G{g}_graph_over_eager"] = total / eager
            line += f"   eager {eager:9.0f} (graph x{total / eager:.2f})"
        echo(line)
    fig[f"pack_k{k}_step_ms_G1"] = 20e3 / fig[f"pack_k{k}_G1"]
    if cuda:
        fig.update(pack_parity(x, dev, k, 20 if quick else 200))
        echo(
            f"  parity after {fig['parity_steps']} steps: pack of 2 vs each run alone max |diff| {fig['parity_pack_vs_solo']:.2e}, "
            f"graphed vs eager {fig['parity_graph_vs_eager']:.2e}"
        )
    if not cuda:  # the solo step (iwae.train's loop) with subnormals kept, as before they were flushed
        torch.set_flush_denormal(False)
        kept = train_throughput(mcfg, k, x, dev, base_steps, repeats, warm=warm)
        torch.set_flush_denormal(True)
        flushed = train_throughput(mcfg, k, x, dev, base_steps, repeats, warm=warm)
        fig.update({f"solo_k{k}_denormals_kept": kept, f"solo_k{k}_denormals_flushed": flushed, f"solo_k{k}_flush_speedup": flushed / kept})
        echo(f"  solo step after {warm} steps: subnormals flushed {flushed:.0f} examples/s, kept {kept:.0f} (x{flushed / kept:.2f})")
    return fig


def pack_parity(x: torch.Tensor, dev: torch.device, k: int, steps: int) -> dict[str, Any]:
    """Largest parameter difference after ``steps`` steps: a VAE and an IWAE trained as a pack of 2
    against each alone (same streams), and the graphed step against the eager one (on a GPU)."""
    from iwae.bounds import VAE

    mcfg = ModelConfig.paper(1)
    cfgs = [RunConfig(model=mcfg, objective=VAE(k=k), seed=0), RunConfig(model=mcfg, objective=IWAE(k=k), seed=1)]

    def trained(members: list[RunConfig], graph: bool) -> list[dict[str, torch.Tensor]]:
        pack = Pack.fresh(members, x.to(dev), graph=graph)
        pack.run_steps(pack.epoch_orders(), 0, steps)
        return [{n: p[g].detach() for n, p in pack.params().items()} for g in range(pack.G)]

    def diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return max(float((a[n] - b[n]).abs().max()) for n in a)

    packed = trained(cfgs, True)
    alone = [trained([c], True)[0] for c in cfgs]
    eager = trained(cfgs, False)
    return {
        "parity_steps": steps,
        "parity_pack_vs_solo": max(diff(p, a) for p, a in zip(packed, alone)),
        "parity_graph_vs_eager": max(diff(p, e) for p, e in zip(packed, eager)),
    }


def _repeat(step: Callable[[int], None], n: int) -> None:
    for i in range(n):
        step(i)


def pyro_throughput(model_cfg: ModelConfig, k: int, data: torch.Tensor, dev: torch.device, steps: int, repeats: int) -> float | None:
    """Pyro's RenyiELBO(alpha=0) (= IWAE) on the same architecture: examples/s at batch 20."""
    try:
        import pyro
        import pyro.distributions as dist
        from pyro.infer import SVI, RenyiELBO
        from pyro.optim import Adam  # type: ignore[attr-defined]
    except ImportError:
        return None
    if len(model_cfg.latent) != 1:
        return None
    pyro.clear_param_store()
    torch.manual_seed(0)
    net = IWAEModel(model_cfg).to(dev)

    def model(x: torch.Tensor) -> None:
        pyro.module("decoder", net.decoder_x)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], model_cfg.latent[0], device=dev), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=net.decoder_x(z)).to_event(1), obs=x)

    def guide(x: torch.Tensor) -> None:
        pyro.module("encoder", net.encoders[0])
        with pyro.plate("data", x.shape[0]):
            mu, log_sigma = net.encoders[0](x)
            pyro.sample("z", dist.Normal(mu, log_sigma.exp()).to_event(1))

    svi = SVI(model, guide, Adam({"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-4}), loss=RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True))
    x_all = data.to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    def step(i: int) -> None:
        svi.step(binarize(x_all[(i * 20) % (len(x_all) - 20) :][:20], gen))

    for i in range(max(5, steps // 5)):
        step(i)
    t = median_time(lambda: _repeat(step, steps), repeats, device_sync(dev))
    return steps * 20 / t


def _fake_results(root: Path, model_cfg: ModelConfig, data: Any) -> tuple[Any, str]:
    """A results folder holding one (untrained) run, for timing evaluation only."""
    from iwae import checkpoint
    from iwae.state import FINAL, start_state
    from pipeline.store.results import Results

    cfg = RunConfig(model=model_cfg, objective=IWAE(k=5), schedule=ScheduleConfig(stages=1))
    res = Results.open(str(root))
    state, _ = start_state(cfg, data, torch.device("cpu"), None, None)
    res.store.write_bytes(f"{res.checkpoint_key(cfg.run_id)}/{FINAL}", checkpoint.to_bytes(state.payload(1)))
    return res, cfg.run_id


def eval_throughput(data: DataSource, mnist: Any, n_images: int, ray_path: bool, echo: Callable[[str], None]) -> dict[str, Any]:
    """k=5000 evaluation through the pipeline's range scorer: in-process, then as Ray tasks."""
    from iwae.evaluate import EvalConfig
    from pipeline.store.estimates import EvalPlan, Span
    from pipeline.store.ledger import EstimateLedger
    from pipeline.work import Scorer

    model_cfg = ModelConfig.paper(1)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="iwae-bench-") as tmp:
        res, run_id = _fake_results(Path(tmp) / "local", model_cfg, mnist)
        plan = EvalPlan(EvalConfig(k=5000), num_images=n_images)
        half = n_images // 2
        parts = [Span(run_id, 0, half - 1), Span(run_id, half, n_images - 1)]  # two tasks' worth, as the Ray path splits them
        ev = Scorer(EstimateLedger(res, plan), data)
        ev.images(run_id)  # load the model and the data before timing
        ev.score(parts[0])  # load the model and compile (start-up, not measured)
        t0 = time.perf_counter()
        for span in parts:
            ev.score(span)
        t_local = time.perf_counter() - t0
        out["eval_images_per_s"] = n_images / t_local
        out["eval_samples_per_s"] = n_images * 5000 / t_local
        if ray_path:
            from pipeline.driver import ray_session
            from pipeline.ray_backend import executor
            from pipeline.ray_backend.cluster import usable_cpus
            from pipeline.ray_backend.resources import Resources
            from pipeline.work import score_unit

            res2, run_id2 = _fake_results(Path(tmp) / "ray", model_cfg, mnist)
            with ray_session(None) as cluster:
                timings: dict[str, float] = {}
                sl = EstimateLedger(res2, plan)
                units = [executor.Unit(str(s), score_unit, (sl, data, [s])) for s in (Span(run_id2, 0, half - 1), Span(run_id2, half, n_images - 1))]
                source = executor.Ready(res2, units)
                executor.run(cluster, source, Resources(cpus=usable_cpus() / len(units), gpus=0.0), what="evaluation", workers=len(units), timings=timings)
                t_ray = timings["work_seconds"]
            out["eval_ray_images_per_s"] = n_images / t_ray
            out["eval_ray_over_local"] = t_local / t_ray
    return out


def ais_cost(dev: torch.device, mnist: Any, quick: bool, k5000_images_per_s: float, images: int | None = None) -> dict[str, float]:
    """Seconds per image per temperature of AIS on the paper's 1-layer model (untrained weights: the
    cost does not depend on them), and the projected cost of T=500 with its 100-temperature pilot.
    ``images`` per batch (default 20; the steps are sequential, so a GPU's cost per image falls as
    its batch grows)."""
    from iwae.ais import AISConfig, ais_log_px
    from iwae.evaluate import binarize_by_id

    n, steps = (4, 10) if quick else (20, 50)
    n = images or n
    model = IWAEModel(ModelConfig.paper(1)).to(dev)
    ids = list(range(n))
    x = binarize_by_id(torch.as_tensor(mnist.test[:n]), ids, 123).to(dev)
    cfg = AISConfig(steps=steps, pilot_steps=0)
    ais_log_px(model, x, AISConfig(steps=2, pilot_steps=0), ids)  # warm-up

    def run() -> None:
        ais_log_px(model, x, cfg, ids)

    t = median_time(run, 1 if quick else 2, device_sync(dev))
    per = t / (n * steps)
    full = AISConfig()  # the default: T=500 after a 100-temperature pilot, 16 chains, 10 leapfrog steps
    s = (full.steps + full.pilot_steps) * per
    return {"ais_s_per_image_per_temperature": per, "ais_T500_s_per_image": s, "ais_T500_over_k5000": s * k5000_images_per_s, "ais_batch_images": n}


def eval_peak_rss_mib(data_dir: Path, n_images: int) -> float:
    """Peak resident memory (MiB) of a fresh process evaluating ``n_images`` test images at k=5000."""
    code = (
        "import resource, torch, sys\n"
        "from iwae.config import ModelConfig\nfrom iwae.models import IWAEModel\nfrom iwae.data import load_mnist\n"
        "from iwae.evaluate import EvalConfig, binarize_by_id, estimate_log_px\n"
        f"d = load_mnist(__import__('pathlib').Path({str(data_dir)!r})); n = {n_images}\n"
        "m = IWAEModel(ModelConfig.paper(1)); ids = list(range(n))\n"
        "x = binarize_by_id(torch.as_tensor(d.test[:n]), ids, 123)\n"
        "estimate_log_px(m, x, ids, EvalConfig(k=5000))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def run_bench(quick: bool, pyro: bool, ray_path: bool, data: DataSource, echo: Callable[[str], None]) -> dict[str, Any]:
    dev = pick_device()
    torch.set_flush_denormal(True)  # as training does (iwae.train.train)
    mnist = data.load("mnist")
    data_dir = data.folder("mnist")
    x = torch.as_tensor(mnist.train[:20_000])
    steps, repeats = (20, 2) if quick else (150, 3)
    fig: dict[str, Any] = {"device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": quick}
    fig["matmul_gflops"] = matmul_peak(dev, quick)
    echo(f"fp32 matmul peak: {fig['matmul_gflops']:.1f} GFLOP/s on {dev} ({fig['threads']} threads)")
    compiled = not quick  # compilation takes ~30 s once; --quick only checks that everything runs
    echo("training examples/s at batch 20 (median of repeats; long runs train compiled, see `train --compile`):")
    for layers, ks in ((1, (1, 5, 50)), (2, (5,))):
        mcfg = ModelConfig.paper(layers)
        for k in ks:
            eager = train_throughput(mcfg, k, x, dev, steps, repeats)
            ours = train_throughput(mcfg, k, x, dev, steps, repeats, compiled=compiled)
            fig[f"train_l{layers}_k{k}_eager"] = eager
            fig[f"train_l{layers}_k{k}_ours"] = ours
            line = f"  {layers}-layer k={k:<3d} eager {eager:7.0f}   ours{' (compiled)' if compiled else ''} {ours:7.0f}"
            if pyro and layers == 1:
                theirs = pyro_throughput(mcfg, k, x, dev, steps, repeats)
                if theirs:
                    fig[f"train_l{layers}_k{k}_pyro"] = theirs
                    fig[f"train_l{layers}_k{k}_ratio"] = ours / theirs
                    line += f"   pyro {theirs:8.0f}   ours/pyro {ours / theirs:5.2f}x"
            echo(line)
    fig.update(bench_packing(x, dev, quick, echo, sizes=(1, 2, 4) if quick else (1, 2, 4, 8, 16)))
    n_images = 8 if quick else 400
    flops = decoder_flops(ModelConfig.paper(1))
    fig["eval_flops_per_sample"] = flops
    fig["eval_roofline_samples_per_s"] = fig["matmul_gflops"] * 1e9 / flops
    fig.update(eval_throughput(data, mnist, n_images, ray_path, echo))
    fig["eval_roofline_fraction"] = fig["eval_samples_per_s"] / fig["eval_roofline_samples_per_s"]
    echo(
        f"k=5000 evaluation, {n_images} images, 1-layer: {fig['eval_samples_per_s']:.0f} samples/s, {fig['eval_images_per_s']:.1f} images/s; "
        f"{flops / 1e3:.0f} kFLOP/sample -> roofline {fig['eval_roofline_samples_per_s']:.0f} samples/s; ours {100 * fig['eval_roofline_fraction']:.0f}% of it"
    )
    if ray_path:
        echo(f"  Ray-sharded path: {fig['eval_ray_images_per_s']:.1f} images/s = {100 * fig['eval_ray_over_local']:.0f}% of in-process (Ray start-up excluded)")
    fig.update(ais_cost(dev, mnist, quick, fig["eval_images_per_s"]))
    echo(
        f"AIS (iwae.ais, 16 chains, 10 leapfrog), 1-layer: {1e3 * fig['ais_s_per_image_per_temperature']:.1f} ms per image per temperature;"
        f" T=500 (+100 pilot) ~ {fig['ais_T500_s_per_image']:.2f} s per image = {fig['ais_T500_over_k5000']:.0f}x the k=5000 estimate"
    )
    fig["eval_peak_rss_mib"] = eval_peak_rss_mib(data_dir, 4 if quick else 50)
    echo(f"  peak RSS of an evaluation process: {fig['eval_peak_rss_mib']:.0f} MiB (bounded by max_rows, not by the number of images)")
    return json.loads(json.dumps(fig))
