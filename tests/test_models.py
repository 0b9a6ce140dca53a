"""The model: paper architecture and init, shapes, logits likelihood, and log p(x) by quadrature."""

import math

import torch

from iwae.config import ModelConfig
from iwae.evaluate import EvalConfig, estimate_log_px
from iwae.models import IWAEModel, bernoulli_log_prob
from tests.tiny import tiny_model


def test_paper_architectures():
    """1- and 2-layer models have the paper's layer sizes and Glorot/zero init."""
    m1 = IWAEModel(ModelConfig.paper(1))
    assert [p.shape for p in m1.encoders[0].parameters()] == [(200, 784), (200,), (200, 200), (200,), (50, 200), (50,), (50, 200), (50,)]
    assert m1.decoder_x.logits.weight.shape == (784, 200)
    w = m1.encoders[0].body[0].weight
    bound = math.sqrt(6 / (784 + 200))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert all((lin.bias == 0).all() for lin in m1.modules() if isinstance(lin, torch.nn.Linear))
    m2 = IWAEModel(ModelConfig.paper(2))
    assert m2.encoders[1].mu.weight.shape == (50, 100) and m2.decoders[0].mu.weight.shape == (100, 100)
    n_params = sum(p.numel() for p in m1.parameters())
    assert n_params == (784 * 200 + 200 + 200 * 200 + 200 + 2 * (200 * 50 + 50)) + (50 * 200 + 200 + 200 * 200 + 200 + 200 * 784 + 784)


def test_output_bias_is_logit_of_mean_pixel():
    """The last decoder bias starts at logit(clip(mean pixel, 1e-3, 1-1e-3)) (authors' code)."""
    m = IWAEModel(ModelConfig(x_dim=3, latent=(2,), hidden_q=((4,),), hidden_p=((4,),)))
    m.init_output_bias(torch.tensor([0.5, 0.0, 0.9]))
    assert torch.allclose(m.decoder_x.logits.bias, torch.tensor([0.0, math.log(1e-3 / (1 - 1e-3)), math.log(9.0)]), atol=1e-5)


def test_encode_once_shapes():
    """Samples are (K, B, D) from one encoder pass per layer; log weights are (K, B)."""
    m = tiny_model(latent=(3, 2))
    calls = []
    m.encoders[0].register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape))
    x = torch.bernoulli(torch.full((4, 6), 0.5, dtype=torch.float64))
    post = m.sample_q(x, 7)
    assert [h.shape for h in post.h] == [(7, 4, 3), (7, 4, 2)]
    assert calls == [(4, 6)]  # x went through the encoder once, not K times
    assert m.log_weights(x, 7).shape == (7, 4)


def test_bernoulli_from_logits_is_exact_and_finite():
    """x*l - softplus(l) equals log sigmoid terms and stays finite for huge logits."""
    logits = torch.tensor([[-800.0, 0.3, 800.0]], dtype=torch.float64)
    x = torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64)
    lp = bernoulli_log_prob(x, logits)
    ref = torch.nn.functional.logsigmoid(torch.tensor(0.3, dtype=torch.float64))
    assert torch.isfinite(lp).all() and abs(lp.item() - ref.item()) < 1e-12


def exact_log_px_by_quadrature(model: IWAEModel, x: torch.Tensor, n: int = 801, lim: float = 7.0) -> torch.Tensor:
    """log p(x) = log int p(x|h) N(h; 0, I) dh on a 2-d grid (trapezoid-free Riemann sum, float64)."""
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    h = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 1, 2)  # (G, 1, 2)
    logits = model.decoder_x(h)  # (G, 1, X)
    out = []
    for row in x:
        log_joint = bernoulli_log_prob(row, logits[:, 0]) - 0.5 * (h[:, 0] ** 2).sum(-1) - math.log(2 * math.pi)
        out.append(torch.logsumexp(log_joint, 0) + 2 * math.log(g[1] - g[0]))
    return torch.stack(out)


def test_k5000_estimate_matches_quadrature_on_2d_bernoulli_model():
    """On a Bernoulli model with a 2-d latent, the k=5000 estimate is within 0.05 nats of log p(x)."""
    m = tiny_model(x_dim=12, latent=(2,), hidden=16, seed=3, scale=1.5)
    with torch.no_grad():  # q(h|x) = N(0.2 * tanh(.), 1.3^2): wider than the posterior, so bounded weights
        m.encoders[0].mu.weight.mul_(0.2)
        m.encoders[0].log_sigma.weight.zero_()
        m.encoders[0].log_sigma.bias.fill_(math.log(1.3))
    x = torch.bernoulli(torch.full((6, 12), 0.5, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = exact_log_px_by_quadrature(m, x)
    est, prefix = estimate_log_px(m, x, list(range(6)), EvalConfig(k=5000, max_rows=20_000))[:2]
    assert (est - exact).abs().max() < 0.05, (est, exact)
    assert (est <= exact + 0.05).all()
    # the prefix bounds come from the same pass: the last one is the estimate, L_50 is looser (L_1, one
    # sample per image, is too noisy on 6 images to rank reliably)
    assert torch.equal(prefix[:, -1], est) and prefix[:, 2].mean() < est.mean()
