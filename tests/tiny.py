"""Tiny models shared by the tests."""

import torch

from iwae.config import ModelConfig
from iwae.models import IWAEModel


def tiny_model(x_dim=6, latent=(2,), hidden=8, seed=0, dtype=torch.float64, scale=1.0) -> IWAEModel:
    torch.manual_seed(seed)
    n = len(latent)
    cfg = ModelConfig(x_dim=x_dim, latent=tuple(latent), hidden_q=((hidden,),) * n, hidden_p=((hidden,),) * n)
    m = IWAEModel(cfg).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m
