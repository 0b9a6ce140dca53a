"""The settings that name an estimate, as plain frozen dataclasses (no torch): the k-sample
evaluation's (:mod:`iwae.evaluate`, paper sec. 5: k=5000) and AIS's (:mod:`iwae.ais`). Readers of
results name estimates from them without loading the evaluators."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AISConfig", "EvalConfig"]


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Evaluation settings. ``k`` and ``seed`` define the estimate; ``max_rows`` only its memory."""

    k: int = 5000
    seed: int = 123  # the authors' srng seed
    block: int = 500  # samples per seeded noise block; part of the estimate's identity
    max_rows: int = 50_000  # images x samples per decoder pass: the memory knob
    prefixes: tuple[int, ...] = (1, 5, 50, 500, 5000)
    compile: bool | None = None  # torch.compile the scoring; None = when >= 1M samples are scored in one call

    def __post_init__(self) -> None:
        for name in ("k", "block", "max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        object.__setattr__(self, "prefixes", tuple(sorted(p for p in self.prefixes if p <= self.k)))


@dataclass(frozen=True, kw_only=True)
class AISConfig:
    """AIS settings. ``steps``, ``chains``, ``leapfrog`` and ``seed`` define the estimate."""

    steps: int = 500  # T intermediate temperatures (Wu et al. use 1k-10k on MNIST; BDMC gaps shrink with T)
    chains: int = 16  # independent chains per image; log p-hat = log-mean-exp over them
    leapfrog: int = 10  # leapfrog steps per HMC transition
    step_size: float = 0.05  # initial eps; the pilot pass adapts it per (chain, image)
    target_accept: float = 0.65  # HMC's optimal acceptance (Beskos et al. 2013), as in Wu et al.
    step_min: float = 1e-4
    step_max: float = 0.5
    pilot_steps: int = 100  # temperatures of the pilot pass that tunes eps; 0 keeps step_size fixed
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "chains", "leapfrog", "pilot_steps", "seed"):
            v = getattr(self, name)
            low = 0 if name in ("pilot_steps", "seed") else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if not 0.0 < self.step_min <= self.step_size <= self.step_max:
            raise ValueError(f"need 0 < step_min <= step_size <= step_max, got {self.step_min}, {self.step_size}, {self.step_max}")
        if not 0.0 < self.target_accept < 1.0:
            raise ValueError(f"target_accept must be in (0, 1), got {self.target_accept}")
