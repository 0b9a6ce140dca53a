"""iwae: the science of iwae-pipeline in plain PyTorch (Burda, Grosse, Salakhutdinov, ICLR 2016).

Models, bounds and gradient estimators, data, the training schedule, the k=5000 evaluator and
active units. No Ray, Typer or pyarrow here: usable from a notebook on one machine.
"""

from iwae.bounds import CIWAE, IWAE, MIWAE, PIWAE, VAE, iwae_bound, log_mean_exp, vae_bound
from iwae.config import ModelConfig, RunConfig, ScheduleConfig
from iwae.evaluate import EvalConfig, estimate_log_px
from iwae.models import IWAEModel

__all__ = [
    "CIWAE",
    "IWAE",
    "MIWAE",
    "PIWAE",
    "VAE",
    "EvalConfig",
    "IWAEModel",
    "ModelConfig",
    "RunConfig",
    "ScheduleConfig",
    "estimate_log_px",
    "iwae_bound",
    "log_mean_exp",
    "vae_bound",
]
