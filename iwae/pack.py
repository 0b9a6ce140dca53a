"""The training loop (Burda et al. 2016, sec. 5.1): G runs of one shape as one pack, and a run alone
as a pack of one, on every device.

At the paper's batch of 20 a training step is launch-bound on a GPU: dozens of tiny kernels around a
few tens of microseconds of arithmetic. A pack holds the parameters of G runs that share the
architecture, the number of samples K, the estimator, the batch size, the schedule and the data in
one flat ``(G, P)`` buffer with a view per layer, maps the one model over them with
``torch.func.vmap`` (batched matmuls; a pack of one calls the model directly), and updates the
buffer with Adam per member (:class:`FlatAdam`, torch's fused kernel).

Each member keeps what makes it its own run:

- its random streams: initialisation (``torch.manual_seed(seed)``), then its own generator draws the
  data order, the binarisation and the noise, in that order, every step;
- its own objective (VAE, IWAE, MIWAE, CIWAE of the same K: the bound is taken per member), and its
  gradient estimator (STL, DReG, PIWAE's: a run of those trains as a pack of one);
- its own Adam step count, learning rate (members may resume at different epochs) and skip of a
  non-finite step;
- its checkpoints (``latest.pt``, ``stage-XX.pt``, ``final.pt``, :mod:`iwae.state`), so a pack resumes
  members trained alone or in another pack.

So member g trains as it would alone, equal to float tolerance (``tests/test_pack.py``).

On a GPU the whole step (gather and binarisation, forward, backward, Adam, the epoch's running
sums) is captured once as a CUDA graph and replayed; only the members' random draws run outside
it, into the graph's static buffers. If capture fails, training goes on eagerly and says once why.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import adam as torch_adam

from iwae import checkpoint
from iwae.config import RunConfig
from iwae.data import Dataset
from iwae.estimators import bound_and_surrogate, uses_fast_path
from iwae.models import IWAEModel
from iwae.state import (
    FINAL,
    Heartbeat,
    NonFiniteError,
    Notice,
    TrainResult,
    TrainState,
    pick_device,
    save_checkpoints,
    stage_of_epoch,
    start_state,
    training_images,
)


def pack_key(cfg: RunConfig) -> str | None:
    """Runs with equal keys can train in one pack; ``None``: the run trains as a pack of one.

    A pack shares everything but the objective's kind (same K), the seed and the starting point.
    Estimators whose gradient is not autograd of the bound (STL, DReG, PIWAE) train alone.
    """
    if not uses_fast_path(cfg.objective, cfg.estimator.value):
        return None
    d = cfg.to_dict()
    shared = {k: d[k] for k in ("dataset", "split", "model", "estimator", "schedule", "train_subset")}
    shared["num_samples"] = cfg.objective.num_samples
    return json.dumps(shared, sort_keys=True, default=list)


def group_packs(cfgs: Sequence[RunConfig], max_size: int) -> list[list[RunConfig]]:
    """``cfgs`` in packs of at most ``max_size`` runs with equal :func:`pack_key` (input order kept)."""
    groups: dict[str, list[RunConfig]] = {}
    out: list[list[RunConfig]] = []
    for c in cfgs:
        key = pack_key(c)
        if key is None or max_size <= 1:
            out.append([c])
            continue
        groups.setdefault(key, []).append(c)
    for members in groups.values():
        out += [members[i : i + max_size] for i in range(0, len(members), max_size)]
    return out


class FlatAdam:
    """Adam (Kingma & Ba 2015) over a flat ``(G, P)`` parameter buffer, each member with its own step
    count, learning rate and skip of a non-finite step.

    Per member one call of torch's fused Adam (``torch.optim.adam.adam(fused=True)``) on its row of
    the buffer: the arithmetic of ``torch.optim.Adam`` (bias-corrected, eps added to the corrected
    sqrt(v)), in one kernel; ``found_inf`` skips the member's step on the device (its parameters,
    moments and step count stay), so nothing is read back to the host and the update can be
    captured in a CUDA graph.
    """

    def __init__(self, exp_avg: Tensor, exp_avg_sq: Tensor, steps: list[Tensor], betas: tuple[float, float], eps: float):
        self.exp_avg, self.exp_avg_sq, self.steps = exp_avg, exp_avg_sq, steps  # (G, P), (G, P), G scalars
        self.beta1, self.beta2 = betas
        self.eps = eps

    @torch.no_grad()
    def step(self, flat: Tensor, grad: Tensor, lr: Tensor, skip: Tensor) -> None:
        """One update of ``flat`` ``(G, P)`` from ``grad`` ``(G, P)``. ``lr`` ``(G,)``; ``skip`` ``(G,)``
        float, 1 where a member's step is not finite."""
        for g in range(flat.shape[0]):
            torch_adam.adam(
                [flat[g]],
                [grad[g]],
                [self.exp_avg[g]],
                [self.exp_avg_sq[g]],
                [],
                [self.steps[g]],
                fused=True,
                found_inf=skip[g],
                amsgrad=False,
                beta1=self.beta1,
                beta2=self.beta2,
                lr=lr[g],
                weight_decay=0.0,
                eps=self.eps,
                maximize=False,
            )


class Pack:
    """G unfinished :class:`~iwae.state.TrainState` s trained as one; see the module docstring.

    ``compile_step``: ``torch.compile`` the bound of a pack of one (the standard estimator): +20% to
    +50% examples/s on a CPU for long runs (bench), after ~30 s of compilation.
    """

    def __init__(self, states: list[TrainState], x_train: Tensor, graph: bool = True, compile_step: bool = False, heartbeat: Heartbeat | None = None):
        self.heartbeat = heartbeat
        keys = {pack_key(s.cfg) for s in states}
        if len(states) > 1 and (None in keys or len(keys) != 1):
            raise ValueError("a pack needs runs of one shape (same data, model, K, estimator and schedule); see iwae.pack.pack_key")
        self.states, self.x_train = states, x_train
        cfg = states[0].cfg
        self.G, dev, dt = len(states), x_train.device, x_train.dtype
        self.objectives = [s.cfg.objective for s in states]
        self.fast = uses_fast_path(cfg.objective, cfg.estimator.value)
        self.estimator = cfg.estimator.value
        self.summed = cfg.schedule.authors_code  # the authors' code sums the minibatch gradient
        named = [dict(s.model.named_parameters()) for s in states]
        self.names = list(named[0])
        self.shapes = [tuple(named[0][n].shape) for n in self.names]
        self.sizes = [math.prod(sh) for sh in self.shapes]
        self.flat = torch.stack([torch.cat([m[n].detach().reshape(-1) for n in self.names]) for m in named])  # (G, P)
        self.solo: IWAEModel | None = None
        if self.G == 1:
            # a run alone: its own module, called directly, its parameters and their gradients views
            # of the pack's rows (``p.data``, ``p.grad``); backward accumulates into the gradient row in
            # place, so the step has no split, select or functional_call and no copy into a flat grad
            self.grad = torch.zeros_like(self.flat)  # (1, P)
            with torch.no_grad():
                for n, sh, v, gv in zip(self.names, self.shapes, torch.split(self.flat[0], self.sizes), torch.split(self.grad[0], self.sizes)):
                    p = named[0][n]
                    p.data = v.view(sh)
                    p.grad = gv.view(sh)
            self.solo = states[0].model
        else:
            self.flat.requires_grad_()  # vmap over the members' views of the rows; autograd fills flat.grad
            self.template = copy.deepcopy(states[0].model).to("meta")  # the code of the model; weights come from the pack
            self._log_w = torch.func.vmap(self._member_log_w)
        moments = []
        for key in ("exp_avg", "exp_avg_sq"):
            rows = []
            for s, m in zip(states, named):
                st = [s.opt.state.get(m[n], {}) for n in self.names]
                rows.append(torch.cat([(x[key] if x else torch.zeros_like(m[n])).detach().reshape(-1) for x, n in zip(st, self.names)]))
            moments.append(torch.stack(rows).to(dev, dt))  # (G, P)
        # torch's Adam counts steps per tensor, but every tensor of a run takes every step: the first one's count is the run's
        first = [s.opt.state.get(m[self.names[0]], {}) for s, m in zip(states, named)]
        steps = [torch.tensor(float(x["step"]) if x else 0.0, device=dev, dtype=torch.float32) for x in first]
        group = states[0].opt.param_groups[0]
        self.adam = FlatAdam(moments[0], moments[1], steps, tuple(group["betas"]), float(group["eps"]))
        self._bound: Any = self._solo_bound
        if compile_step and self.fast and self.G == 1:
            self._bound = torch.compile(self._solo_bound, dynamic=False)
        bs, k = cfg.schedule.batch_size, cfg.objective.num_samples
        # static inputs of one step (a CUDA graph reads them from fixed addresses)
        self.idx = torch.zeros((self.G, bs), dtype=torch.long, device=dev)
        self.u = torch.full((self.G, bs, x_train.shape[1]), 0.5, device=dev, dtype=dt)  # (G, B, X) uniforms
        self.eps = [torch.zeros((self.G, k, bs, d), device=dev, dtype=dt) for d in cfg.model.latent]  # [(G, K, B, D_l)]
        self.lr = torch.zeros(self.G, device=dev, dtype=dt)
        self.bound_sum, self.skipped, self.gnorm_sum = (torch.zeros(self.G, device=dev, dtype=dt) for _ in range(3))
        self.graph: Any = None
        self.graph_error = ""
        if graph and dev.type == "cuda":
            try:
                self.graph = self._capture()
            except Exception as e:  # an unsupported op or driver: eager steps give the same numbers, slower
                self.graph_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(f"CUDA graph capture of the training step failed ({self.graph_error}); training eagerly", stacklevel=2)

    @property
    def compiled(self) -> bool:
        """The step runs torch.compile'd code (asked for, and not fallen back to eager after a failure)."""
        return self._bound != self._solo_bound  # bound methods: equal, never identical

    @classmethod
    def fresh(cls, cfgs: Sequence[RunConfig], x_train: Tensor, graph: bool = True, compile_step: bool = False) -> Pack:
        """A pack of freshly initialised runs ``cfgs`` on ``x_train`` (timings and probes: no checkpoints)."""
        data = Dataset("probe", x_train.cpu().numpy(), x_train[:1].cpu().numpy())  # the output bias comes from these images
        return cls([start_state(c, data, x_train.device, None, None)[0] for c in cfgs], x_train, graph=graph, compile_step=compile_step)

    def examples_per_s(self, steps: int, repeats: int = 1) -> float:
        """Training examples/s summed over the members: the median of ``repeats`` timings of ``steps``
        steps (they train the pack: for timings and probes only)."""
        orders = self.epoch_orders()
        cuda = self.x_train.device.type == "cuda"
        times = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            self.run_steps(orders, 0, steps)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return self.G * steps * self.idx.shape[1] / statistics.median(times)

    def params(self) -> dict[str, Tensor]:
        """Each layer's parameters as a view of the flat buffer: ``{name: (G, *shape)}``."""
        return {n: t.view(self.G, *sh) for n, sh, t in zip(self.names, self.shapes, torch.split(self.flat, self.sizes, dim=1))}

    def _member_log_w(self, params: dict[str, Tensor], x: Tensor, eps: list[Tensor]) -> Tensor:
        return torch.func.functional_call(self.template, params, (x, eps))  # (B, X) -> (K, B)

    def _solo_bound(self, x: Tensor, eps: list[Tensor]) -> Tensor:
        """A run alone: its per-example bound ``(B,)``; autograd of it is the standard estimator."""
        assert self.solo is not None
        return self.objectives[0].bound(self.solo(x, eps))

    def _step(self) -> None:
        """Everything of one step after the random draws: no host reads (graph-capturable)."""
        x = (self.u < self.x_train[self.idx]).to(self.u.dtype)  # (G, B, X): dynamic binarisation, as iwae.data.binarize
        if self.solo is not None:  # a run alone: its model called directly, with any estimator
            self.grad.zero_()
            eps = [e[0] for e in self.eps]
            if self.fast:
                try:
                    b = self._bound(x[0], eps)  # (B,)
                except Exception as e:  # a compiler missing on this machine must not stop training
                    if self._bound == self._solo_bound:
                        raise
                    warnings.warn(f"torch.compile failed ({type(e).__name__}); training eagerly", stacklevel=2)
                    self._bound = self._solo_bound
                    b = self._bound(x[0], eps)
                bound = surrogate = b[None]  # (1, B)
            else:
                b, s = bound_and_surrogate(self.solo, x[0], self.objectives[0], self.estimator, eps=eps)
                bound, surrogate = b[None], s[None]  # (1, B)
        else:
            log_w = self._log_w(self.params(), x, self.eps)  # (G, K, B)
            bound = surrogate = torch.stack([obj.bound(log_w[g]) for g, obj in enumerate(self.objectives)])  # (G, B)
        per = surrogate.sum(1) if self.summed else surrogate.mean(1)  # (G,): each member's own loss is -per[g]
        (-per).sum().backward()  # members share no parameter: each gets the gradient of its own loss
        grad = self.grad if self.solo is not None else self.flat.grad  # (G, P)
        assert grad is not None
        gnorm = grad.square().sum(1).sqrt()  # (G,)
        ok = torch.isfinite(gnorm) & torch.isfinite(per)
        okf = ok.to(per.dtype)
        self.adam.step(self.flat, grad, self.lr, 1.0 - okf)
        with torch.no_grad():
            self.skipped.add_(1.0 - okf)
            self.gnorm_sum.add_(torch.nan_to_num(gnorm, nan=0.0, posinf=0.0) * okf)
            self.bound_sum.add_(torch.nan_to_num(bound.detach().sum(1), nan=0.0, neginf=0.0) * okf)

    def _state_tensors(self) -> list[Tensor]:
        return [self.flat, self.adam.exp_avg, self.adam.exp_avg_sq, *self.adam.steps, self.bound_sum, self.skipped, self.gnorm_sum]

    def _capture(self) -> Any:
        """Capture :meth:`_step` as a CUDA graph (torch docs, "whole network capture"); the warm-up
        steps it needs run on a snapshot that is put back, so capture changes no number."""
        saved = [t.detach().clone() for t in self._state_tensors()]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.flat.grad = None
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.flat.grad = None
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
        finally:  # a failed capture too: the eager fallback must start from the members' own state
            with torch.no_grad():
                for t, s in zip(self._state_tensors(), saved):
                    t.copy_(s)
        return graph

    def run_steps(self, orders: Tensor, first: int, count: int) -> None:
        """Steps ``first .. first+count-1`` of an epoch whose data orders are ``orders`` ``(G, N)``
        (a step past the epoch's last whole batch wraps round to its first: benchmarks only)."""
        bs = self.idx.shape[1]
        per_epoch = orders.shape[1] // bs
        for step in range(first, first + count):
            b = step % per_epoch
            self.idx.copy_(orders[:, b * bs : (b + 1) * bs])
            for g, s in enumerate(self.states):  # each member's own stream: binarisation, then noise
                torch.rand(self.u[g].shape, generator=s.gen, out=self.u[g])
                for e in self.eps:
                    torch.randn(e[g].shape, generator=s.gen, out=e[g])
            if self.graph is not None:
                self.graph.replay()
            else:
                self.flat.grad = None
                self._step()
            if self.heartbeat is not None:
                self.heartbeat.beat()

    def epoch_orders(self) -> Tensor:
        """Each member's data order for its next epoch ``(G, N)`` (drawn from its own generator)."""
        n, dev = self.x_train.shape[0], self.x_train.device
        return torch.stack(
            [torch.arange(n, device=dev) if s.cfg.schedule.authors_code else torch.randperm(n, generator=s.gen, device=dev) for s in self.states]
        )

    def train_epoch(self, max_skip_fraction: float = 0.01) -> list[dict[str, Any] | NonFiniteError]:
        """One epoch of every member: its metrics row, or the :class:`NonFiniteError` of a member that
        diverged (more than ``max_skip_fraction`` of its steps were non-finite and skipped; its epoch
        count is not advanced and the caller drops it without saving, so its last checkpoint stays
        the one to retry from).

        ``seconds`` is the pack's wall time for the epoch, the same for every member: what each run
        waited, not its share of the device (divide by the pack's size for that)."""
        n, bs = self.x_train.shape[0], self.idx.shape[1]
        steps = n // bs  # the authors drop the last partial batch
        plan = [stage_of_epoch(s.cfg, s.epoch) for s in self.states]
        self.lr.copy_(torch.tensor([lr for _, lr in plan], dtype=self.lr.dtype))
        for t in (self.bound_sum, self.skipped, self.gnorm_sum):
            t.zero_()
        orders = self.epoch_orders()
        t0 = time.perf_counter()
        self.run_steps(orders, 0, steps)
        skipped, bound_sum, gnorm_sum = (t.tolist() for t in (self.skipped, self.bound_sum, self.gnorm_sum))  # one host sync per epoch
        dt = time.perf_counter() - t0
        self._check_views()
        self._write_back()
        out: list[dict[str, Any] | NonFiniteError] = []
        for g, s in enumerate(self.states):
            n_skipped = int(round(skipped[g]))
            good = steps - n_skipped
            if n_skipped > max(1, max_skip_fraction * steps):
                out.append(NonFiniteError(f"run {s.cfg.run_id}: {n_skipped} of {steps} steps were non-finite in epoch {s.epoch + 1}; it diverged"))
                continue
            s.epoch += 1
            s.seconds += dt
            row = {
                "epoch": s.epoch,
                "stage": plan[g][0],
                "lr": plan[g][1],
                "train_bound": bound_sum[g] / max(good * bs, 1) if good else float("nan"),
                "grad_norm": gnorm_sum[g] / max(good, 1) if good else float("nan"),
                "skipped_steps": n_skipped,
                "steps": steps,
                "seconds": dt,
                "examples_per_s": steps * bs / dt,
            }
            s.history.append(row)
            out.append(row)
        return out

    def _check_views(self) -> None:
        """A run alone: its parameters and gradients must still be views of the pack's rows. Anything
        that set ``p.grad = None`` (an ``optimizer.zero_grad()``) would leave the gradient row at zero
        and Adam stepping on nothing: stop in one line instead."""
        if self.solo is None:
            return
        rows = (self.flat.untyped_storage().data_ptr(), self.grad.untyped_storage().data_ptr())
        for n, p in self.solo.named_parameters():
            if p.grad is None or (p.untyped_storage().data_ptr(), p.grad.untyped_storage().data_ptr()) != rows:
                raise RuntimeError(f"parameter {n} of the run no longer views the pack's buffers (was its .grad reset?); training cannot go on")

    @torch.no_grad()
    def _write_back(self) -> None:
        """Copy each member's row into its own model and Adam (what its checkpoints save)."""
        lrs = self.lr.tolist()
        for g, s in enumerate(self.states):
            named = dict(s.model.named_parameters())
            step = float(self.adam.steps[g])
            for n, a, b in zip(self.names, torch.split(self.adam.exp_avg[g], self.sizes), torch.split(self.adam.exp_avg_sq[g], self.sizes)):
                p = named[n]
                s.opt.state[p] = {
                    "step": torch.tensor(step, dtype=torch.float32),
                    "exp_avg": a.view(p.shape).clone(),
                    "exp_avg_sq": b.view(p.shape).clone(),
                }
            if self.solo is None:  # a run alone's parameters are the buffer already
                for n, view in self.params().items():
                    named[n].copy_(view[g])
            for group in s.opt.param_groups:
                group["lr"] = lrs[g]


def train_pack(
    cfgs: Sequence[RunConfig],
    data: Dataset,
    sinks: Sequence[checkpoint.Checkpoints | None],
    *,
    device: str | torch.device | None = None,
    inits: Sequence[dict[str, Any] | None] | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    max_skip_fraction: float = 0.01,
    graph: bool = True,
    compile_step: bool | str = "auto",
    progress: bool = False,
    notice: Notice | None = None,
    heartbeat: Heartbeat | None = None,
) -> list[TrainResult | NonFiniteError]:
    """The training loop: the runs ``cfgs`` (one :func:`pack_key`, or one run) as one pack, each
    resumed from its own sink.

    Args:
        cfgs: the members; ``sinks[g]`` holds member g's checkpoints (``None``: in memory only).
        inits: per member, a checkpoint to start from (Table 2's objective swap): model and Adam state.
        on_epoch: called with ``(member index, metrics row)`` after each member's epoch.
        max_skip_fraction: more non-finite steps than this in an epoch stops a member (NonFiniteError).
        graph: on a GPU, replay the step as a CUDA graph (eager fallback if capture fails).
        compile_step: ``torch.compile`` the bound of a run alone (standard estimator). ``"auto"``: on
            a CPU, runs of at least 500k training examples, where the ~30 s of compilation is repaid;
            a failure falls back to eager with a warning.
        progress: a progress bar (epochs, the bounds).
        notice: where one-line notices go (a run resumed from another device's checkpoint).
        heartbeat: counts the steps for a watcher on another thread, and stops the loop with
            :class:`~iwae.state.Stopped` before a checkpoint once asked to (a lease lost, say).

    Returns, per member, its :class:`~iwae.state.TrainResult`, or the :class:`NonFiniteError` that
    stopped it (the other members go on). Members already finished are returned as they are.

    Training flushes subnormal floats to zero for the process (``torch.set_flush_denormal``): IWAE's
    normalised weights softmax(log_w) underflow into that range for the worst of K=50 samples, and
    the backward pass multiplies them through the decoder; x86 pays a microcode assist per such
    operation (k=50 steps 1.6-1.9x slower on 2 cores, bench), with no visible change in the bound.
    """
    torch.set_flush_denormal(True)
    dev = pick_device(device)
    inits = list(inits) if inits is not None else [None] * len(cfgs)
    started = [start_state(c, data, dev, s, i, notice) for c, s, i in zip(cfgs, sinks, inits)]
    states = [st for st, _ in started]
    x_train = training_images(cfgs[0], data, dev)
    total = cfgs[0].schedule.total_epochs
    if compile_step == "auto":
        compile_step = dev.type == "cpu" and len(cfgs) == 1 and (total - states[0].epoch) * x_train.shape[0] >= 500_000
    errors: dict[int, NonFiniteError] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        desc = cfgs[0].label() if len(cfgs) == 1 else f"pack of {len(cfgs)}"
        bar = tqdm(total=total, initial=min(s.epoch for s in states), desc=desc, unit="epoch", dynamic_ncols=True)
    for s in states:
        s.model.train()
    active: list[int] = []
    pack: Pack | None = None
    flags: dict[int, tuple[bool, bool]] = {}  # member -> (graphed, compiled) of the pack that trained its last epoch
    while True:
        todo = [g for g, s in enumerate(states) if s.epoch < total and g not in errors]
        if not todo:
            break
        if todo != active:  # a member finished or failed: the pack is rebuilt from the others
            active, pack = todo, Pack([states[g] for g in todo], x_train, graph=graph, compile_step=bool(compile_step), heartbeat=heartbeat)
        assert pack is not None
        rows = pack.train_epoch(max_skip_fraction)
        if heartbeat is not None:
            heartbeat.check()  # asked to stop: before any checkpoint of this epoch
        for g in active:
            flags[g] = (pack.graph is not None, pack.compiled)
        for g, row in zip(active, rows):
            if isinstance(row, NonFiniteError):
                errors[g] = row
                continue
            if sinks[g] is not None:
                save_checkpoints(states[g], sinks[g])  # type: ignore[arg-type]
                if heartbeat is not None:
                    heartbeat.beat()
            if on_epoch is not None:
                on_epoch(g, row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(bound=" ".join(f"{r['train_bound']:.1f}" for r in rows if isinstance(r, dict)))
    if bar is not None:
        bar.close()
    out: list[TrainResult | NonFiniteError] = []
    for g, (s, resumed) in enumerate(started):
        if g in errors:
            out.append(errors[g])
            continue
        sink = sinks[g]
        if sink is not None and FINAL not in sink.names():  # resumed past the end (a listing, not a download)
            if heartbeat is not None:
                heartbeat.check()
            sink.write(FINAL, checkpoint.to_bytes(s.payload(total)))
        graphed, compiled = flags.get(g, (False, False))
        out.append(TrainResult(s.model, s.history, s.seconds, resumed, graphed, compiled))
    return out


def member_bytes(cfg: RunConfig) -> int:
    """A generous estimate of one member's GPU memory: parameters, gradients and Adam moments, and
    the activations of one step (forward values kept for the backward, ~8 per unit and sample)."""
    m = cfg.model
    dims = [m.x_dim, *m.latent]
    widths = [w for hs in (*m.hidden_q, *m.hidden_p) for w in hs] + [m.x_dim, *[2 * d for d in m.latent]]
    params = sum(p.numel() for p in IWAEModel(m).parameters())
    activations = cfg.objective.num_samples * cfg.schedule.batch_size * (sum(widths) + sum(dims))
    return 4 * (4 * params + 8 * activations)


def auto_pack_size(cfgs: Sequence[RunConfig], x_train: Tensor, max_size: int = 64) -> int:
    """How many runs of ``cfgs`` (one pack key) to train as one pack on ``x_train``'s device.

    On a GPU: all of them, up to ``max_size`` and to half the free memory. On a CPU a pack pays only
    where this machine says so (``iwae-pipeline bench``: about 1.3x for a pack of 2-4 at k=50 on 2
    cores, less at small k): time a few steps of a pack of 1 and of up to 4, keep the faster.
    """
    n = len(cfgs)
    if n <= 1:
        return 1
    dev = x_train.device
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return max(1, min(n, max_size, int(free // 2 // member_bytes(cfgs[0]))))
    if x_train.shape[0] // cfgs[0].schedule.batch_size < 12:  # too little data to time a step
        return 1
    rates = {}
    for size in (1, min(n, 4)):
        pack = Pack.fresh(cfgs[:size], x_train, graph=False)
        pack.run_steps(pack.epoch_orders(), 0, 2)  # warm-up
        rates[size] = pack.examples_per_s(max(3, 24 // size))
    best = max(rates, key=lambda s: rates[s])
    return best if rates[best] > 1.1 * rates[1] else 1
