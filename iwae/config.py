"""Frozen, keyword-only run configuration (model, objective, estimator, data, schedule).

A run's id is a short hash of its flattened config; the flattened config goes into every
checkpoint and every result row, so a number can always be traced back to what made it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from iwae.bounds import IWAE, Objective, objective_from_dict, objective_to_dict


class Estimator(str, Enum):
    """Gradient estimator of the encoder (``iwae.estimators``): compares and serialises as its name."""

    standard = "standard"
    stl = "stl"
    dreg = "dreg"


ESTIMATORS = tuple(e.value for e in Estimator)
DATASETS = ("mnist", "omniglot", "synthetic")
SPLITS = ("paper", "authors")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture (paper sec. 5.1, App. C). Defaults are the 1-stochastic-layer MNIST model.

    ``latent`` lists stochastic layer sizes bottom-up (h1 first); ``hidden_q[l]`` the tanh widths of
    q(h_{l+1} | h_l) and ``hidden_p[l]`` those of p(h_l | h_{l+1}) with h_0 = x.
    """

    x_dim: int = 784
    latent: tuple[int, ...] = (50,)
    hidden_q: tuple[tuple[int, ...], ...] = ((200, 200),)
    hidden_p: tuple[tuple[int, ...], ...] = ((200, 200),)

    def __post_init__(self) -> None:
        n = len(self.latent)
        if n < 1 or len(self.hidden_q) != n or len(self.hidden_p) != n:
            raise ValueError("latent, hidden_q and hidden_p need one entry per stochastic layer")
        for v in (self.x_dim, *self.latent, *(h for hs in self.hidden_q + self.hidden_p for h in hs)):
            if int(v) < 1:
                raise ValueError(f"layer sizes must be >= 1, got {v}")

    @classmethod
    def paper(cls, layers: int, x_dim: int = 784) -> ModelConfig:
        """The paper's 1- or 2-stochastic-layer architecture (protocol sec. 1)."""
        if layers == 1:
            return cls(x_dim=x_dim)
        if layers == 2:
            return cls(
                x_dim=x_dim,
                latent=(100, 50),
                hidden_q=((200, 200), (100, 100)),
                hidden_p=((200, 200), (100, 100)),
            )
        raise ValueError(f"the paper has 1 or 2 stochastic layers, got {layers}")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """The paper's schedule (sec. 5.1): stage i runs 3^i epochs at lr 1e-3 * 10^(-i/7), i = 0..7.

    ``stages`` cuts it to its first stages and ``epoch_scale`` scales every stage's epochs (rounded,
    at least 1) for CPU budgets. ``authors_code`` switches to the released code's choices:
    rounded rates (7.2e-4, 5.2e-4, ...), Adam beta1 = 0.99, summed minibatch gradients and no
    shuffling. ``lr``/``epochs`` override the schedule with one constant stage (Table 2's 3^7
    epochs at 1e-4).
    """

    stages: int = 8
    epoch_scale: float = 1.0
    authors_code: bool = False
    batch_size: int = 20
    epochs: int | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.stages <= 8:
            raise ValueError(f"stages must be in 1..8, got {self.stages}")
        if self.epoch_scale <= 0:
            raise ValueError(f"epoch_scale must be > 0, got {self.epoch_scale}")
        # one spelling per value, so that the run id (a hash of the config) does not depend on 1 vs 1.0
        object.__setattr__(self, "epoch_scale", float(self.epoch_scale))
        if self.lr is not None:
            object.__setattr__(self, "lr", float(self.lr))
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if (self.epochs is None) != (self.lr is None):
            raise ValueError("give both epochs and lr for a constant schedule, or neither")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    def plan(self) -> list[tuple[int, float]]:
        """``[(epochs, lr), ...]`` one entry per stage."""
        if self.epochs is not None and self.lr is not None:
            return [(self.epochs, self.lr)]
        out = []
        for i in range(self.stages):
            if self.authors_code:
                lr = 1e-4 * round(10 ** (1 - i / 7.0), 1)  # yburda/iwae experiments.py (1-based i there)
            else:
                lr = 1e-3 * 10 ** (-i / 7.0)
            out.append((max(1, round(3**i * self.epoch_scale)), lr))
        return out

    @property
    def total_epochs(self) -> int:
        return sum(e for e, _ in self.plan())

    @property
    def beta1(self) -> float:
        return 0.99 if self.authors_code else 0.9


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything that defines one training run; ``run_id`` is a hash of it."""

    dataset: str = "mnist"
    split: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: Objective = field(default_factory=lambda: IWAE(k=1))  # a dict {"name": ..., "k": ...} is accepted and parsed once
    estimator: Estimator = Estimator.standard  # or its name
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    seed: int = 0
    init_from: str | None = None  # run id whose final checkpoint (model + Adam state) starts this run
    train_subset: int | None = None  # first N training examples only (tests, demos)
    num_active_examples: int = 500  # active units from the first N training examples (authors' code)

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {DATASETS}")
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; choose one of {SPLITS}")
        if str(getattr(self.estimator, "value", self.estimator)) not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; choose one of {ESTIMATORS}")
        object.__setattr__(self, "estimator", Estimator(getattr(self.estimator, "value", self.estimator)))
        if isinstance(self.objective, dict):  # parsed here, once; everything after holds the typed objective
            object.__setattr__(self, "objective", objective_from_dict(self.objective))
        if self.train_subset is not None and self.train_subset < 1:
            raise ValueError("train_subset must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (the objective as ``{"name": ..., ...}``, the estimator as its name): what
        checkpoints, Tune and the run id see."""
        d = dataclasses.asdict(self)
        d["objective"] = objective_to_dict(self.objective)
        d["estimator"] = self.estimator.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        m = dict(d.pop("model"))
        model = ModelConfig(
            x_dim=int(m["x_dim"]),
            latent=tuple(int(v) for v in m["latent"]),
            hidden_q=tuple(tuple(int(v) for v in hs) for hs in m["hidden_q"]),
            hidden_p=tuple(tuple(int(v) for v in hs) for hs in m["hidden_p"]),
        )
        schedule = ScheduleConfig(**d.pop("schedule"))
        return cls(model=model, schedule=schedule, **d)

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def cell_id(self) -> str:
        """The cell the run belongs to (:func:`cell_key` of its :meth:`setting`): the tables compare
        runs only within a cell, so two runs of one objective kind and seed in one cell would be one
        run (the same config, the same id)."""
        return cell_key(self.setting())

    def flat(self) -> dict[str, Any]:
        """Flattened config for result rows: scalar columns only."""
        obj = objective_to_dict(self.objective)
        return {
            "run_id": self.run_id,
            "dataset": self.dataset,
            "split": self.split,
            "layers": len(self.model.latent),
            "latent": "-".join(str(v) for v in self.model.latent),
            "objective": str(obj["name"]),
            "k": int(obj.get("k", 1)),
            "m": int(obj.get("m", 1)),
            "beta": float(obj.get("beta", float("nan"))),
            "estimator": self.estimator.value,
            "seed": self.seed,
            "stages": self.schedule.stages,
            "epoch_scale": float(self.schedule.epoch_scale),
            "epochs": self.schedule.total_epochs,
            "authors_code": self.schedule.authors_code,
            "init_from": self.init_from or "",
            "train_subset": int(self.train_subset or 0),
        }

    def setting(self) -> dict[str, Any]:
        """Everything that defines the run as scalars: :meth:`flat` and the fields it leaves out
        (hidden sizes, batch size, a constant schedule, the active-unit images). A report reads runs
        back from this, and earlier rows (which have only the flat columns) take the defaults."""
        s = self.schedule
        return {
            **self.flat(),
            "x_dim": self.model.x_dim,
            "hidden_q": json.dumps(self.model.hidden_q),
            "hidden_p": json.dumps(self.model.hidden_p),
            "batch_size": s.batch_size,
            "constant_epochs": s.epochs or 0,
            "constant_lr": s.lr or 0.0,
            "num_active_examples": self.num_active_examples,
        }

    def label(self) -> str:
        o = objective_to_dict(self.objective)
        extra = ",".join(f"{k}={v}" for k, v in o.items() if k != "name")
        est = "" if self.estimator == Estimator.standard else f"/{self.estimator.value}"
        return f"{self.dataset} L{len(self.model.latent)} {o['name'].upper()}({extra}){est}"


CELL_FREE = ("run_id", "objective", "seed")  # what varies within a cell: the objective's kind, and the seed


def cell_key(setting: dict[str, Any], free: tuple[str, ...] = CELL_FREE) -> str:
    """A short hash of a run's :meth:`RunConfig.setting` without the ``free`` fields.

    With the default, the one cell key every table pairs runs by: a VAE and an IWAE trained alike
    (same data, architecture, k, estimator, schedule cut, training subset, starting point) share it,
    over seeds. The estimators table frees the estimator and the bound as well (matched cost), and
    Table 2 the bound (a swap beside its control)."""
    kept = {k: v for k, v in setting.items() if k not in free}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]
