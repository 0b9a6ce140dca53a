"""What a model learned, as pictures: samples from p(x) and test images beside their reconstructions.

Researchers look at samples and reconstructions before they read a likelihood. Both are Bernoulli
means (the probabilities a pixel is on), which show more than a binary draw: a sample draws
h_L ~ N(0, I) and each h_l ~ p(h_l | h_{l+1}) (paper sec. 2), then shows sigmoid(logits of p(x | h_1));
a reconstruction encodes a binarised test image with the posterior means of q (h_1's mean, then each
higher layer's mean at the one below) and decodes the same way through the means of p. Grids come
from torchvision's image-grid utility.
"""

from __future__ import annotations

import torch
from torch import Tensor

from iwae.models import IWAEModel


@torch.no_grad()
def sample_means(model: IWAEModel, n: int, seed: int = 0) -> Tensor:
    """Bernoulli means of ``n`` ancestral samples from the model: ``(n, X)`` in [0, 1]."""
    ref = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    dims = model.cfg.latent
    h = torch.randn(n, dims[-1], generator=g).to(ref)  # (n, D_L)
    for i in reversed(range(len(model.decoders))):
        mu, log_sigma = model.decoders[i](h)  # p(h_{i+1} | h_{i+2})
        h = mu + log_sigma.exp() * torch.randn(n, dims[i], generator=g).to(ref)  # (n, D_i)
    return torch.sigmoid(model.decoder_x(h)).cpu()


@torch.no_grad()
def reconstruction_means(model: IWAEModel, x: Tensor) -> Tensor:
    """Bernoulli means of the reconstructions of binary images ``x`` ``(n, X)``: encode with q's means,
    decode with p's means. ``(n, X)`` in [0, 1]."""
    ref = next(model.parameters())
    h = x.to(ref)
    for enc in model.encoders:
        h, _ = enc(h)  # the posterior mean of each layer, at the mean below
    for dec in reversed(model.decoders):
        h, _ = dec(h)
    return torch.sigmoid(model.decoder_x(h)).cpu()


def grid(images: Tensor, nrow: int, fortran: bool = False, side: int = 28) -> Tensor:
    """``(n, side*side)`` images as one ``(side-ish, ...)`` grid for ``imshow`` (torchvision's
    make_grid, one channel). ``fortran``: pixels stored column-major (the Omniglot file's order)."""
    from torchvision.utils import make_grid

    img = images.reshape(-1, 1, side, side)
    if fortran:
        img = img.transpose(-1, -2)
    return make_grid(img, nrow=nrow, padding=2, pad_value=0.0)[0]  # (H, W); white gaps under a reversed grey map
