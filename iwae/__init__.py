"""iwae: the science of iwae-pipeline in plain PyTorch (Burda, Grosse, Salakhutdinov, ICLR 2016).

Models, bounds and gradient estimators, data, the training schedule, the k=5000 evaluator and
active units. No Ray, Typer or pyarrow here: usable from a notebook on one machine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from iwae.bounds import CIWAE, IWAE, MIWAE, PIWAE, VAE, iwae_bound, log_mean_exp, vae_bound
    from iwae.config import ModelConfig, RunConfig, ScheduleConfig
    from iwae.evaluate import estimate_log_px
    from iwae.models import IWAEModel
    from iwae.settings import EvalConfig

# imported when first asked for (PEP 562), so that a module that needs no torch (iwae.settings, which
# the results readers use) does not load it through this package
_WHERE = {
    **dict.fromkeys(["CIWAE", "IWAE", "MIWAE", "PIWAE", "VAE", "iwae_bound", "log_mean_exp", "vae_bound"], "iwae.bounds"),
    **dict.fromkeys(["ModelConfig", "RunConfig", "ScheduleConfig"], "iwae.config"),
    "estimate_log_px": "iwae.evaluate",
    "IWAEModel": "iwae.models",
    "EvalConfig": "iwae.settings",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'iwae' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


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
