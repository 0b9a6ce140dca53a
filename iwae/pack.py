"""Packed training: G runs of one shape train as one model (the paper's schedule, sec. 5.1, per run).

At the paper's batch of 20 a training step is launch-bound on a GPU: dozens of tiny kernels around a
few tens of microseconds of arithmetic. A pack stacks the parameters of G runs that share the
architecture, the number of samples K, the estimator, the batch size, the schedule and the data
along a leading G axis, maps the one model over them with ``torch.func.vmap`` (batched matmuls) and
updates them with one Adam over the stacked tensors (:class:`PackedAdam`).

Each member keeps what makes it its own run:

- its random streams: initialisation (``torch.manual_seed(seed)``), then its own generator draws the
  data order, the binarisation and the noise in the solo run's order;
- its own objective (VAE, IWAE, MIWAE, CIWAE of the same K: the bound is taken per member);
- its own Adam step count, learning rate (members may resume at different epochs) and skip of a
  non-finite step;
- its checkpoints, in the solo format (``latest.pt``, ``stage-XX.pt``, ``final.pt``), written through
  its own :class:`~iwae.train.TrainState`, so a pack resumes members trained solo or in another pack.

So member g trains as its solo run does, equal to float tolerance (``tests/test_pack.py``).

On a GPU the whole step (gather and binarisation, forward, backward, Adam, the epoch's running
sums) is captured once as a CUDA graph and replayed; only the members' random draws run outside
it, into the graph's static buffers. If capture fails, training goes on eagerly and says once why.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from iwae import checkpoint
from iwae.config import RunConfig
from iwae.data import Dataset
from iwae.estimators import uses_fast_path
from iwae.models import IWAEModel
from iwae.train import FINAL, NonFiniteError, TrainResult, TrainState, pick_device, save_checkpoints, stage_of_epoch, start_state, training_images


def pack_key(cfg: RunConfig) -> str | None:
    """Runs with equal keys can train in one pack; ``None``: the run trains solo.

    A pack shares everything but the objective's kind (same K), the seed and the starting point.
    Estimators whose gradient is not autograd of the bound (STL, DReG, PIWAE) train solo.
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


class PackedAdam:
    """Adam (Kingma & Ba 2015) over stacked ``(G, ...)`` parameters; each member has its own step.

    The arithmetic of ``torch.optim.Adam`` (bias-corrected, eps added to the corrected sqrt(v)), with
    a per-member step count, learning rate and mask: a member whose step is not finite keeps its
    parameters, moments and step count, as fused Adam's ``found_inf`` does for a solo run. Only
    tensor operations, no host reads, so the update can be captured in a CUDA graph.
    """

    def __init__(self, exp_avg: list[Tensor], exp_avg_sq: list[Tensor], step: Tensor, betas: tuple[float, float], eps: float):
        self.exp_avg, self.exp_avg_sq, self.step_count = exp_avg, exp_avg_sq, step  # step_count (G,) float
        self.beta1, self.beta2 = betas
        self.eps = eps

    @torch.no_grad()
    def step(self, params: list[Tensor], grads: list[Tensor], lr: Tensor, ok: Tensor) -> None:
        """One update. ``lr`` ``(G,)``; ``ok`` ``(G,)`` bool: which members take their step."""
        okf = ok.to(self.step_count.dtype)
        self.step_count.add_(okf)
        t = self.step_count.clamp_min(1.0)  # a member that never stepped is masked out below anyway
        bc1 = 1.0 - torch.pow(self.beta1, t)  # (G,)
        bc2_sqrt = (1.0 - torch.pow(self.beta2, t)).sqrt()
        step_size = lr / bc1  # (G,)
        for p, g, m, v in zip(params, grads, self.exp_avg, self.exp_avg_sq):
            shape = (-1,) + (1,) * (p.dim() - 1)
            okb = ok.view(shape)
            g = torch.where(okb, g, torch.zeros_like(g))  # a skipped member's NaN never reaches its moments
            m.copy_(torch.where(okb, m.lerp(g, 1.0 - self.beta1), m))
            v.copy_(torch.where(okb, v * self.beta2 + (1.0 - self.beta2) * g * g, v))
            denom = v.sqrt() / bc2_sqrt.view(shape) + self.eps
            p.sub_(torch.where(okb, step_size.view(shape) * m / denom, torch.zeros_like(p)))


class Pack:
    """G unfinished :class:`~iwae.train.TrainState` s trained as one; see the module docstring."""

    def __init__(self, states: list[TrainState], x_train: Tensor, graph: bool = True):
        keys = {pack_key(s.cfg) for s in states}
        if None in keys or len(keys) != 1:
            raise ValueError("a pack needs runs of one shape (same data, model, K, estimator and schedule); see iwae.pack.pack_key")
        self.states, self.x_train = states, x_train
        cfg = states[0].cfg
        self.G, dev, dt = len(states), x_train.device, x_train.dtype
        self.objectives = [s.cfg.objective for s in states]
        self.summed = cfg.schedule.authors_code  # the authors' code sums the minibatch gradient
        self.names = [n for n, _ in states[0].model.named_parameters()]
        members = [dict(s.model.named_parameters()) for s in states]
        self.params = {n: torch.stack([m[n].detach() for m in members]).requires_grad_() for n in self.names}  # (G, ...)
        group = states[0].opt.param_groups[0]
        m, v = [], []
        for n in self.names:
            st = [s.opt.state.get(mem[n], {}) for s, mem in zip(states, members)]
            m.append(torch.stack([x["exp_avg"] if x else torch.zeros_like(mem[n]) for x, mem in zip(st, members)]).detach().clone())
            v.append(torch.stack([x["exp_avg_sq"] if x else torch.zeros_like(mem[n]) for x, mem in zip(st, members)]).detach().clone())
        # torch's Adam counts steps per tensor, but every tensor of a run takes every step: the first one's count is the run's
        first = [s.opt.state.get(mem[self.names[0]], {}) for s, mem in zip(states, members)]
        steps = torch.tensor([float(x["step"]) if x else 0.0 for x in first], device=dev, dtype=dt)
        self.adam = PackedAdam(m, v, steps, tuple(group["betas"]), float(group["eps"]))
        self.template = copy.deepcopy(states[0].model).to("meta")  # the code of the model; weights come from the pack
        self._log_w = torch.func.vmap(self._member_log_w)
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

    @classmethod
    def fresh(cls, cfgs: Sequence[RunConfig], x_train: Tensor, graph: bool = True) -> Pack:
        """A pack of freshly initialised runs ``cfgs`` on ``x_train`` (timings and probes: no checkpoints)."""
        data = Dataset("probe", x_train.cpu().numpy(), x_train[:1].cpu().numpy())  # the output bias comes from these images
        return cls([start_state(c, data, x_train.device, None, None)[0] for c in cfgs], x_train, graph=graph)

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

    def _member_log_w(self, params: dict[str, Tensor], x: Tensor, eps: list[Tensor]) -> Tensor:
        return torch.func.functional_call(self.template, params, (x, eps))  # (B, X) -> (K, B)

    def _zero_grads(self) -> None:
        for p in self.params.values():
            p.grad = None

    def _step(self) -> None:
        """Everything of one step after the random draws: no host reads (graph-capturable)."""
        G = self.G
        x = (self.u < self.x_train[self.idx]).to(self.u.dtype)  # (G, B, X): dynamic binarisation, as iwae.data.binarize
        log_w = self._log_w(self.params, x, self.eps)  # (G, K, B)
        bound = torch.stack([obj.bound(log_w[g]) for g, obj in enumerate(self.objectives)])  # (G, B)
        per = bound.sum(1) if self.summed else bound.mean(1)  # (G,): each member's own loss is -per[g]
        (-per).sum().backward()  # members share no parameter: each gets the gradient of its own loss
        params = [self.params[n] for n in self.names]
        grads = [p.grad for p in params]
        gnorm = torch.stack([g.reshape(G, -1).square().sum(1) for g in grads]).sum(0).sqrt()  # type: ignore[union-attr]  # (G,)
        ok = torch.isfinite(gnorm) & torch.isfinite(per)
        self.adam.step(params, grads, self.lr, ok)  # type: ignore[arg-type]
        okf = ok.to(per.dtype)
        with torch.no_grad():
            self.skipped.add_(1.0 - okf)
            self.gnorm_sum.add_(torch.nan_to_num(gnorm, nan=0.0, posinf=0.0) * okf)
            self.bound_sum.add_(torch.nan_to_num(bound.detach().sum(1), nan=0.0, neginf=0.0) * okf)

    def _state_tensors(self) -> list[Tensor]:
        return [*self.params.values(), *self.adam.exp_avg, *self.adam.exp_avg_sq, self.adam.step_count, self.bound_sum, self.skipped, self.gnorm_sum]

    def _capture(self) -> Any:
        """Capture :meth:`_step` as a CUDA graph (torch docs, "whole network capture"); the warm-up
        steps it needs run on a snapshot that is put back, so capture changes no number."""
        saved = [t.detach().clone() for t in self._state_tensors()]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._zero_grads()
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            self._zero_grads()
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
            for g, s in enumerate(self.states):  # each member's own stream, in the solo order: binarisation, then noise
                torch.rand(self.u[g].shape, generator=s.gen, out=self.u[g])
                for e in self.eps:
                    torch.randn(e[g].shape, generator=s.gen, out=e[g])
            if self.graph is not None:
                self.graph.replay()
            else:
                self._zero_grads()
                self._step()

    def epoch_orders(self) -> Tensor:
        """Each member's data order for its next epoch ``(G, N)`` (drawn from its own generator)."""
        n, dev = self.x_train.shape[0], self.x_train.device
        return torch.stack(
            [torch.arange(n, device=dev) if s.cfg.schedule.authors_code else torch.randperm(n, generator=s.gen, device=dev) for s in self.states]
        )

    def train_epoch(self, max_skip_fraction: float = 0.01) -> list[dict[str, Any] | NonFiniteError]:
        """One epoch of every member; its metrics row (as :func:`iwae.train.train_epoch`'s) or the
        :class:`NonFiniteError` of a member that diverged (its epoch count is not advanced and the
        caller drops it without saving; its last checkpoint stays the one to retry from).

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

    @torch.no_grad()
    def _write_back(self) -> None:
        """Copy each member's slice into its own model and Adam (what its checkpoints save)."""
        steps, lrs = self.adam.step_count.tolist(), self.lr.tolist()
        for g, s in enumerate(self.states):
            named = dict(s.model.named_parameters())
            for i, n in enumerate(self.names):
                p = named[n]
                p.copy_(self.params[n][g])
                s.opt.state[p] = {
                    "step": torch.tensor(steps[g], dtype=torch.float32, device=p.device),
                    "exp_avg": self.adam.exp_avg[i][g].clone(),
                    "exp_avg_sq": self.adam.exp_avg_sq[i][g].clone(),
                }
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
    progress: bool = False,
) -> list[TrainResult | NonFiniteError]:
    """Train the runs ``cfgs`` (one :func:`pack_key`) as one pack; resume each from its own sink.

    Args:
        cfgs: the members; ``sinks[g]`` holds member g's checkpoints (``None``: in memory only).
        inits: per member, a checkpoint to start from (Table 2's objective swap), as in ``train``.
        on_epoch: called with ``(member index, metrics row)`` after each member's epoch.
        graph: on a GPU, replay the step as a CUDA graph (eager fallback if capture fails).

    Returns, per member, its :class:`~iwae.train.TrainResult`, or the :class:`NonFiniteError` that
    stopped it (the other members go on). Members already finished are returned as they are.
    """
    torch.set_flush_denormal(True)  # see iwae.train.train: subnormal IWAE weights in the backward slow x86 ~2x
    dev = pick_device(device)
    inits = list(inits) if inits is not None else [None] * len(cfgs)
    started = [start_state(c, data, dev, s, i) for c, s, i in zip(cfgs, sinks, inits)]
    states = [st for st, _ in started]
    x_train = training_images(cfgs[0], data, dev)
    total = cfgs[0].schedule.total_epochs
    errors: dict[int, NonFiniteError] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=min(s.epoch for s in states), desc=f"pack of {len(cfgs)}", unit="epoch", dynamic_ncols=True)
    for s in states:
        s.model.train()
    active: list[int] = []
    pack: Pack | None = None
    while True:
        todo = [g for g, s in enumerate(states) if s.epoch < total and g not in errors]
        if not todo:
            break
        if todo != active:  # a member finished or failed: the pack is rebuilt from the others
            active, pack = todo, Pack([states[g] for g in todo], x_train, graph=graph)
        assert pack is not None
        rows = pack.train_epoch(max_skip_fraction)
        for g, row in zip(active, rows):
            if isinstance(row, NonFiniteError):
                errors[g] = row
                continue
            if sinks[g] is not None:
                save_checkpoints(states[g], sinks[g])  # type: ignore[arg-type]
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
        if sink is not None and sink.read(FINAL) is None:  # resumed past the end
            sink.write(FINAL, checkpoint.to_bytes(s.payload(total)))
        out.append(TrainResult(s.model, s.history, s.seconds, resumed))
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
