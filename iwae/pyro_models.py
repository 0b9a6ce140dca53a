"""A Pyro model and guide as a :class:`~iwae.latent.LatentModel`: per-datapoint log p(x) by k-sample
importance sampling, AIS and BDMC, which Pyro itself does not give (pyro-ppl/pyro#3373, #3416: its
importance weights sum over the data plate; #179 asks for AIS and BDMC).

``from_pyro(model, guide, modules={"enc": enc, "dec": dec})`` wraps a model written the usual way::

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], 50]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(z)).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            mu, log_sigma = enc(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(mu, log_sigma.exp()).to_event(1))

What it finds on the first call, from one trace of each (and refuses in one line naming the site and
why: :class:`~iwae.latent.Unscorable`):

- the **data plate**: the plate of the observed sites whose size is the batch (or the one named by
  ``plate=``); not subsampled;
- the **local latent sites**: every unobserved site of the model, each inside the data plate and
  in no other plate, continuous (not enumerated, no discrete support), each a layer of latents;
- each site's **unconstrained space**: ``biject_to(support)`` of the model's distribution (a Gamma
  rate, a Beta, a LogNormal, a Dirichlet's simplex), so the evaluators, AIS's HMC included, work on
  ``u`` in R^D, with log p(x, T(u)) + log|det dT/du| and log q(T(u)) + log|det dT/du|: the weights
  p/q are those of the constrained latents.

Shapes as everywhere: x ``(B, X)``, latents ``[(K, B, D_l)]`` in site order, log densities ``(K, B)``.
The K draws run as one vectorised particle plate outside the model's own plates, so the model and
guide must broadcast over leading batch dimensions, as Pyro's ``vectorize_particles=True`` asks
(``lam.unsqueeze(-1).expand(*lam.shape, X)``, not ``expand(x.shape)``). An image's draws
come from its own generator only, so its estimate does not depend on its batch: a guide site whose
distribution is Normal (or Independent Normal) is drawn by reparameterisation from the image's own
standard normal noise, exactly as :class:`~iwae.adapter.DistributionModel` draws it (the same
networks give the same numbers); any other guide is run once per image under a seed taken from
that image's generator. Networks must be ``nn.Module`` s (``modules=``, or a ``PyroModule`` model or
guide): they are what moves to the device, what ``eval()`` reaches and what a model's key digests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Independent, Normal, biject_to

from iwae.latent import Proposal, Unscorable, normal_draws


@dataclass(frozen=True)
class _Site:
    """A local latent site of the model: its name, event shape, and its unconstrained transform."""

    name: str
    event_shape: tuple[int, ...]
    transform: Any  # biject_to(support): unconstrained u -> constrained value
    dim: int  # D of u, flattened

    def unconstrained_shape(self) -> tuple[int, ...]:
        return tuple(self.transform.inverse_shape(torch.Size(self.event_shape)))


def _sample_sites(trace: Any) -> list[dict[str, Any]]:
    """The trace's sample sites, without the plates' own subsample sites."""
    from pyro.poutine.util import site_is_subsample

    return [s for s in trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)]


def _value(trace: Any, name: str) -> Tensor:
    value: Tensor = trace.nodes[name]["value"]
    return value


def _unwrap(d: Any) -> Any:
    while isinstance(d, Independent) or type(d).__name__ == "Independent":
        d = d.base_dist
    return d


class PyroModel(nn.Module):
    """A Pyro model and guide as a latent-variable model (module docstring). Use :func:`from_pyro`."""

    def __init__(
        self,
        model: Callable[..., Any],
        guide: Callable[..., Any],
        *,
        modules: dict[str, nn.Module] | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        plate: str | None = None,
        x_dim: int | None = None,
    ):
        super().__init__()
        import pyro  # noqa: F401  # the optional extra: pip install 'iwae-pipeline[pyro]'

        self.model, self.guide = model, guide
        self.nets = nn.ModuleDict(dict(modules or {}))
        for name, obj in (("pyro_model", model), ("pyro_guide", guide)):
            if isinstance(obj, nn.Module):
                self.add_module(name, obj)
        self.args, self.kwargs, self.plate_name = tuple(args), dict(kwargs or {}), plate
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # where the model lives
        self._sites: list[_Site] | None = None
        self.x_dim = x_dim  # known from the first images scored; simulate (BDMC) needs it before any
        self._particle_dim = -2
        self._continuous = False

    @property
    def continuous(self) -> bool:
        """Whether the observed sites are densities (known once the model has been called)."""
        return self._continuous

    # ------------------------------------------------------------------ what the model is

    def _call(self, fn: Callable[..., Any], x: Tensor | None, what: str) -> Any:
        import pyro.poutine as poutine

        try:
            return poutine.trace(fn).get_trace(x, *self.args, **self.kwargs)
        except Unscorable:
            raise
        except TypeError as e:
            raise Unscorable(
                f"calling the {what} as {what}(x) fails ({type(e).__name__}: {str(e).splitlines()[0][:120]}); give it what it needs:"
                " from_pyro(model, guide, args=(...), kwargs={...})"
            ) from None

    def _inspect(self, x: Tensor) -> list[_Site]:
        """The data plate and the local latent sites, from one trace of the model and one of the guide."""
        if self._sites is not None:
            return self._sites
        b = x.shape[0]
        self.x_dim = int(x.shape[1])
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):  # the traces draw from the prior: not from the caller's stream
            return self._find(x, b)

    def _find(self, x: Tensor, b: int) -> list[_Site]:
        tr = self._call(self.model, x, "model")
        samples = _sample_sites(tr)
        observed = [s for s in samples if s["is_observed"]]
        if not observed:
            raise Unscorable("the model observes nothing: give its likelihood site obs=x")
        frames = [f for f in observed[0]["cond_indep_stack"] if f.vectorized]
        data = [f for f in frames if (f.name == self.plate_name if self.plate_name else f.size == b)]
        if not data:
            named = f"a plate named {self.plate_name!r}" if self.plate_name else f"a plate of size {b} (the batch)"
            raise Unscorable(
                f"the observed site {observed[0]['name']!r} is in no data plate ({named}): wrap the observations in pyro.plate('data', x.shape[0])"
                " so that each image is scored on its own"
            )
        plate = data[0]
        if plate.full_size is not None and plate.full_size != plate.size:
            raise Unscorable(f"the data plate {plate.name!r} is subsampled ({plate.size} of {plate.full_size}): score the images you pass, without subsample")
        nesting = max((-f.dim for s in samples for f in s["cond_indep_stack"] if f.vectorized), default=1)
        self._particle_dim = -(nesting + 1)
        sites = []
        for s in samples:
            if s["is_observed"]:
                continue
            name, fn = s["name"], s["fn"]
            inside = [f.name for f in s["cond_indep_stack"] if f.vectorized]
            if plate.name not in inside:
                raise Unscorable(
                    f"site {name!r} is a global latent (outside the data plate {plate.name!r}): its draws would be shared by every image, so there"
                    " is no per-image log p(x); fix it as a parameter, or move it inside the plate"
                )
            if s["infer"].get("enumerate") or fn.support.is_discrete:
                raise Unscorable(f"site {name!r} is discrete ({type(_unwrap(fn)).__name__}): importance sampling here and AIS's HMC need continuous latents")
            if len(inside) > 1:
                raise Unscorable(f"site {name!r} is in plates {inside} besides the data plate: each image's latents must be one layer of values")
            t = biject_to(fn.support)
            shape = tuple(fn.event_shape)
            sites.append(_Site(name, shape, t, int(math.prod(t.inverse_shape(torch.Size(shape))))))
        if not sites:
            raise Unscorable("the model has no latent site to score over")
        g = self._call(self.guide, x, "guide")
        have = {s["name"] for s in _sample_sites(g) if not s["is_observed"]}
        missing = [s.name for s in sites if s.name not in have]
        if missing:
            raise Unscorable(f"the guide has no site {missing[0]!r} (the model's latent): the guide must propose every latent of the model")
        extra = sorted(have - {s.name for s in sites})
        if extra:
            raise Unscorable(f"the guide samples {extra[0]!r}, which the model does not: an auxiliary site (AutoNormal's) has no density here")
        self._continuous = not all(s["fn"].support.is_discrete for s in observed)
        self._sites = sites
        return sites

    # ------------------------------------------------------------------ the protocol

    def _plate(self, k: int) -> Any:
        import pyro

        return pyro.plate("_iwae_particles", k, dim=self._particle_dim)

    def _values(self, us: Sequence[Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """Unconstrained latents ``[(K, B, D_l)]`` as the sites' values, and sum log|det dT/du| ``(K, B)``."""
        assert self._sites is not None
        values, ladj = {}, torch.zeros(us[0].shape[:2], dtype=us[0].dtype, device=us[0].device)
        for site, u in zip(self._sites, us):
            uu = u.reshape(*u.shape[:2], *site.unconstrained_shape())
            v = site.transform(uu)
            values[site.name] = v
            j = site.transform.log_abs_det_jacobian(uu, v)
            ladj = ladj + j.reshape(*u.shape[:2], -1).sum(-1)
        return values, ladj

    def _log_prob(self, trace: Any, k: int, b: int) -> Tensor:
        """The sum of the trace's sample sites' log densities, per particle and image ``(K, B)``."""
        total = None
        for s in _sample_sites(trace):
            lp = s["fn"].log_prob(s["value"])
            lp = lp.expand(k, b) if lp.dim() <= 2 else lp.reshape(k, b, -1).sum(-1)
            total = lp if total is None else total + lp
        assert total is not None
        return total

    def _guide_density(self, x: Tensor, values: dict[str, Tensor], k: int) -> Tensor:
        import pyro
        import pyro.poutine as poutine

        with pyro.validation_enabled(False), self._plate(k):  # an HMC step may leave the support numerically (exp(u) = 0): -inf, rejected
            tr = poutine.trace(poutine.condition(self.guide, data=values)).get_trace(x, *self.args, **self.kwargs)
        return self._log_prob(tr, k, x.shape[0])

    def propose(self, x: Tensor, k: int, generators: Sequence[torch.Generator]) -> Proposal:
        import pyro.poutine as poutine

        sites = self._inspect(x)
        b = x.shape[0]
        drawn = _Draws(generators, k, x)
        with drawn, self._plate(k):  # outside the particle plate: it sees each site broadcast to (K, B)
            tr = poutine.trace(self.guide).get_trace(x, *self.args, **self.kwargs)
        if drawn.other:  # a guide site that is not Normal: the guide again, once per image, under the image's own seed
            values = self._per_image(x, k, generators)
        else:
            values = {s.name: _value(tr, s.name) for s in sites}
        us = [s.transform.inv(values[s.name]).reshape(k, b, s.dim) for s in sites]  # [(K, B, D_l)]
        us = [u.detach() for u in us]

        def log_density(hs: list[Tensor]) -> Tensor:
            vals, ladj = self._values(hs)
            return self._guide_density(x, vals, hs[0].shape[0]) + ladj

        return Proposal(us, log_density(us), log_density)

    def _per_image(self, x: Tensor, k: int, generators: Sequence[torch.Generator]) -> dict[str, Tensor]:
        import pyro.poutine as poutine

        assert self._sites is not None
        parts: dict[str, list[Tensor]] = {s.name: [] for s in self._sites}
        for i, g in enumerate(generators):
            seed = int(torch.randint(0, 2**62, (1,), generator=g))
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                torch.manual_seed(seed)
                with self._plate(k):
                    tr = poutine.trace(self.guide).get_trace(x[i : i + 1], *self.args, **self.kwargs)
            for s in self._sites:
                parts[s.name].append(_value(tr, s.name))
        return {name: torch.cat(v, 1) for name, v in parts.items()}

    def log_joint(self, x: Tensor, h: list[Tensor]) -> Tensor:
        import pyro
        import pyro.poutine as poutine

        self._inspect(x)
        k = h[0].shape[0]
        values, ladj = self._values(h)
        with pyro.validation_enabled(False), self._plate(k):  # as in _guide_density: a value at the support's edge scores -inf, not an error
            tr = poutine.trace(poutine.condition(self.model, data=values)).get_trace(x, *self.args, **self.kwargs)
        return self._log_prob(tr, k, x.shape[0]) + ladj

    @torch.no_grad()
    def simulate(self, n: int, generators: Sequence[torch.Generator]) -> tuple[Tensor, list[Tensor]]:
        """(x, h) from the model run without its observations (``poutine.uncondition``), one image per
        generator, under a seed taken from it; h in the unconstrained space."""
        import pyro.poutine as poutine

        anchor: Tensor = self._anchor  # type: ignore[assignment]
        if self._sites is None:
            if self.x_dim is None:
                raise Unscorable("simulating (BDMC) before any image was scored needs the data's width: from_pyro(..., x_dim=X)")
            self._inspect(torch.zeros(2, self.x_dim, dtype=anchor.dtype, device=anchor.device))
        sites = self._sites
        assert sites is not None and self.x_dim is not None
        blank = torch.zeros(1, self.x_dim, dtype=anchor.dtype, device=anchor.device)
        xs: list[Tensor] = []
        hs: list[list[Tensor]] = [[] for _ in sites]
        for g in generators:
            seed = int(torch.randint(0, 2**62, (1,), generator=g))
            with torch.random.fork_rng(devices=[anchor.device] if anchor.device.type == "cuda" else []):
                torch.manual_seed(seed)
                tr = poutine.trace(poutine.uncondition(self.model)).get_trace(blank, *self.args, **self.kwargs)
            obs = [s for s in _sample_sites(tr) if s["name"] not in {t.name for t in sites}]
            xs.append(_value(tr, str(obs[0]["name"])).reshape(1, -1))
            for j, s in enumerate(sites):
                hs[j].append(s.transform.inv(_value(tr, s.name)).reshape(1, s.dim))
        return torch.cat(xs), [torch.cat(h) for h in hs]

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # an nn.Module needs one; the evaluators call the protocol
        raise TypeError("a PyroModel is scored through propose, log_joint and simulate (iwae.latent.LatentModel)")


class _Draws:
    """A Pyro messenger for the guide's run: every unobserved site whose distribution is Normal is
    drawn by reparameterisation from each image's own generator (``(K, B, *event)``, images on the
    batch dim); any other site is left to Pyro and flagged (``other``): the caller then runs the
    guide once per image instead."""

    def __init__(self, generators: Sequence[torch.Generator], k: int, like: Tensor):
        from pyro.poutine.messenger import Messenger

        outer = self
        self.generators, self.k, self.like, self.other = generators, k, like, False

        class M(Messenger):
            def _pyro_sample(self, msg: dict[str, Any]) -> None:
                fn = msg["fn"]
                if msg["is_observed"] or msg["value"] is not None or not hasattr(fn, "batch_shape"):  # a plate's own subsample site
                    return
                base = _unwrap(fn)
                shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
                if not isinstance(base, Normal) or len(shape) < 2 or shape[0] != outer.k or shape[1] != len(outer.generators):
                    outer.other = True
                    return
                d = int(math.prod(shape[2:])) if len(shape) > 2 else 1
                eps = normal_draws(outer.generators, outer.k, d, outer.like).reshape(shape)  # (K, B, *event), image b's from its own generator
                msg["value"] = base.loc.expand(shape) + base.scale.expand(shape) * eps
                msg["done"] = True

        self.messenger = M()

    def __enter__(self) -> _Draws:
        self.messenger.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.messenger.__exit__(*exc)


def from_pyro(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *,
    modules: dict[str, nn.Module] | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    plate: str | None = None,
    x_dim: int | None = None,
) -> PyroModel:
    """A Pyro ``model(x, *args, **kwargs)`` and ``guide`` (same signature) as a model the evaluators
    score (module docstring). ``modules``: the networks they use (registered: device, eval mode, the
    key's digest); ``plate``: the data plate's name when its size is not the batch's; ``x_dim``: the
    data's width, for simulating (BDMC) before any image was scored."""
    return PyroModel(model, guide, modules=modules, args=args, kwargs=kwargs, plate=plate, x_dim=x_dim)
