"""Pyro models and guides through `score` (iwae.pyro_models): a Pyro VAE gives the per-image numbers
of the same networks written with torch.distributions; a Gamma rate with Poisson counts (its marginal
is negative binomial, exactly) is scored by k-sample IS, AIS and BDMC within their errors, its latent
moved to the unconstrained space; what cannot be scored is refused in one line."""

import math

import numpy as np
import pytest
import torch

from iwae.ais import AISConfig, simulate_by_id
from pipeline.cli import main
from pipeline.store.estimates import read_estimates

pytest.importorskip("pyro")
pytestmark = pytest.mark.slow

NETS = """
import torch
from torch import nn

torch.manual_seed(3)
enc = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))  # x -> (mu, log sigma) of a 4-unit latent
dec = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 16))  # h -> logits of 16 pixels
"""

PYRO_VAE = """
import pyro
import pyro.distributions as dist
from nets import enc, dec
from iwae.pyro_models import from_pyro


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 4), 1.0).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=dec(z)).to_event(1), obs=x)


def guide(x):
    with pyro.plate("data", x.shape[0]):
        mu, log_sigma = enc(x).chunk(2, -1)
        pyro.sample("z", dist.Normal(mu, log_sigma.exp()).to_event(1))


def make_model():
    return from_pyro(model, guide, modules={"enc": enc, "dec": dec})
"""

TORCH_VAE = """
from torch.distributions import Bernoulli, Independent
from nets import enc, dec
from iwae.adapter import DistributionModel, gaussian_encoder


def make_model():
    m = DistributionModel(gaussian_encoder(lambda x: enc(x).chunk(2, -1)), lambda h: Independent(Bernoulli(logits=dec(h)), 1), latent_dim=4)
    m.enc, m.dec = enc, dec
    return m
"""

GAMMA_POISSON = '''
"""lambda ~ Gamma(A, B) per image; its X = 6 counts ~ Poisson(lambda): the marginal is negative binomial.
The guide is a LogNormal moment-matched to the exact Gamma posterior: close, not exact."""
import math
import pyro
import pyro.distributions as dist
import torch
from iwae.pyro_models import from_pyro

A, B, X = 3.0, 0.5, 6
rates = torch.nn.Module()
rates.register_buffer("a", torch.tensor(A))  # the model's constants, what its key's digest is taken of
rates.register_buffer("b", torch.tensor(B))


def model(x):
    with pyro.plate("data", x.shape[0]):
        lam = pyro.sample("lam", dist.Gamma(rates.a, rates.b))
        pyro.sample("x", dist.Poisson(lam.unsqueeze(-1).expand(*lam.shape, x.shape[-1])).to_event(1), obs=x)  # broadcast-safe, as for vectorize_particles


def guide(x):
    with pyro.plate("data", x.shape[0]):
        shape, rate = rates.a + x.sum(-1), rates.b + x.shape[1]
        mean, var = shape / rate, shape / rate**2
        s2 = torch.log1p(var / mean**2)
        pyro.sample("lam", dist.LogNormal(torch.log(mean) - s2 / 2, s2.sqrt()))


def exact_log_px(x):
    s, n = x.sum(-1), x.shape[-1]
    return (A * math.log(B) - math.lgamma(A) - torch.lgamma(x + 1).sum(-1) + torch.lgamma(A + s) - (A + s) * torch.log(torch.tensor(B + n)))


def make_model():
    return from_pyro(model, guide, modules={"rates": rates}, x_dim=X)
'''


def _module(folder, name, text):
    (folder / f"{name}.py").write_text(text)
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_{folder.name}", folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    import sys

    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(folder))
    return mod


def _rows(results, table, estimate):
    return read_estimates(str(results), table, None).pipe(lambda d: d[d.estimate.astype(str).str.startswith(estimate)]).set_index("image_id").sort_index()


def test_a_pyro_vae_gives_the_numbers_of_the_same_networks_as_torch_distributions(capsys, ray_local, tmp_path):
    """A Pyro VAE (Normal latent, Bernoulli pixels) and the same networks through DistributionModel,
    scored by `score` on Ray: the same per-image L_5000 and the same AIS, to float tolerance (the Pyro
    guide's Normal is drawn from each image's own noise, as the adapter draws it)."""
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "nets.py").write_text(NETS)
    (folder / "pyro_vae.py").write_text(PYRO_VAE)
    (folder / "torch_vae.py").write_text(TORCH_VAE)
    x = (np.random.default_rng(0).random((40, 16)) < 0.4).astype(np.float32)
    np.save(folder / "x.npy", x)
    results = tmp_path / "r"
    for name in ("pyro_vae", "torch_vae"):
        common = [f"{folder}/{name}.py:make_model", "--name", name, "--data", folder / "x.npy", "--results", results]
        assert main([str(a) for a in ["score", *common, "--eval-workers", "2"]]) == 0, capsys.readouterr().err
        assert main([str(a) for a in ["score", *common, "--method", "ais", "--ais-images", 10, "--ais-steps", 30, "--ais-chains", 4]]) == 0
    capsys.readouterr()
    ev = read_estimates(str(results), estimate=None)
    by = {str(r).split("-")[0]: g.set_index("image_id").log_px.sort_index() for r, g in ev.groupby("run_id", observed=True)}
    assert len(by["pyro_vae"]) == 40 and by["pyro_vae"].notna().all()
    np.testing.assert_allclose(by["pyro_vae"].to_numpy(), by["torch_vae"].to_numpy(), rtol=0, atol=1e-4)
    ais = read_estimates(str(results), "ais", None)
    a = {str(r).split("-")[0]: g.set_index("image_id").log_px_ais.sort_index() for r, g in ais.groupby("run_id", observed=True)}
    assert len(a["pyro_vae"]) == 10
    np.testing.assert_allclose(a["pyro_vae"].to_numpy(), a["torch_vae"].to_numpy(), rtol=0, atol=1e-3)


def test_a_constrained_latent_is_scored_in_unconstrained_space_by_is_ais_and_bdmc(capsys, ray_local, tmp_path):
    """A Gamma rate with Poisson counts, through `score`: k-sample IS and AIS within their errors of the
    exact negative-binomial log p(x), HMC running on log lambda; BDMC's bounds bracket the exact log
    p(x) of the images it simulated from the model."""
    folder = tmp_path / "gp"
    folder.mkdir()
    mod = _module(folder, "gp", GAMMA_POISSON)
    lam = np.random.default_rng(1).gamma(3.0, 1 / 0.5, 60)
    x = np.random.default_rng(2).poisson(lam[:, None], (60, 6)).astype(np.float32)
    np.save(folder / "counts.npy", x)
    results = tmp_path / "r"
    common = [f"{folder}/gp.py:make_model", "--name", "gp", "--data", folder / "counts.npy", "--results", results]
    assert main([str(a) for a in ["score", *common, "--eval-k", 2000]]) == 0, capsys.readouterr().err
    assert main([str(a) for a in ["score", *common, "--method", "ais", "--ais-images", 30, "--ais-steps", 100, "--ais-chains", 8]]) == 0
    assert main([str(a) for a in ["score", *common, "--method", "bdmc", "--bdmc-images", 20, "--ais-steps", 100, "--ais-chains", 8]]) == 0
    capsys.readouterr()
    exact = mod.exact_log_px(torch.as_tensor(x, dtype=torch.float64)).numpy()
    ev = _rows(results, "eval", "k2000")
    d = ev.log_px.to_numpy() - exact
    assert len(ev) == 60 and abs(d.mean()) < 3 * max(ev.mcse.mean() / math.sqrt(60), 1e-3) + 0.01 and np.abs(d).max() < 0.05, (d.mean(), np.abs(d).max())
    ais = _rows(results, "ais", "T100")
    assert len(ais) == 30 and abs((ais.log_px_ais.to_numpy() - exact[:30]).mean()) < 0.02
    b = _rows(results, "bdmc", "T100")
    model = mod.make_model()
    xs, _ = simulate_by_id(model, list(range(20)), AISConfig(steps=100, chains=8).seed)
    truth = mod.exact_log_px(xs.double()).numpy()
    lower, upper = b.log_px_ais.to_numpy(), b.log_px_upper.to_numpy()
    assert len(b) == 20 and (lower - truth).mean() < 0.02 and (upper - truth).mean() > -0.02 and (upper - lower).mean() < 0.2


BAD = {
    "no plate": (
        """
def model(x):
    z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(x.shape), 1.0).to_event(1), obs=x)


def guide(x):
    pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
""",
        "in no data plate",
    ),
    "a global latent": (
        """
def model(x):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(w.expand(x.shape), 1.0).to_event(1), obs=x)


def guide(x):
    pyro.sample("w", dist.Normal(0.0, 1.0))
""",
        "site 'w' is a global latent",
    ),
    "an enumerated discrete site": (
        """
def model(x):
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Categorical(torch.ones(3) / 3), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(c.unsqueeze(-1).float().expand(x.shape), 1.0).to_event(1), obs=x)


def guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("c", dist.Categorical(torch.ones(x.shape[0], 3) / 3))
""",
        "site 'c' is discrete",
    ),
    "arguments it is not given": (
        """
def model(x, scale):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), scale).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(x.shape), 1.0).to_event(1), obs=x)


def guide(x, scale):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), scale).to_event(1))
""",
        "give it what it needs",
    ),
    "a subsampled plate": (
        """
def model(x):
    with pyro.plate("data", 1000, subsample_size=x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(x.shape), 1.0).to_event(1), obs=x)


def guide(x):
    with pyro.plate("data", 1000, subsample_size=x.shape[0]):
        pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
""",
        "is subsampled",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_what_cannot_be_scored_is_refused_in_one_line(capsys, tmp_path, case):
    """No data plate, a global latent, an enumerated discrete site, a model that needs arguments the
    factory does not give, a subsampled data plate: each one line naming the site (or plate) and why,
    exit 2, nothing written."""
    code, why = BAD[case]
    folder = tmp_path / "bad"
    folder.mkdir()
    head = "import torch\nimport pyro\nimport pyro.distributions as dist\nfrom iwae.pyro_models import from_pyro\n"
    tail = "\n\ndef make_model():\n    m = from_pyro(model, guide)\n    m.register_buffer('w0', torch.zeros(1))\n    return m\n"
    (folder / "bad.py").write_text(head + code + tail)
    np.save(folder / "x.npy", np.zeros((8, 4), dtype=np.float32))
    results = tmp_path / "r"
    rc = main(["score", f"{folder}/bad.py:make_model", "--data", str(folder / "x.npy"), "--results", str(results)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and why in err[0], err
    assert not results.exists()
