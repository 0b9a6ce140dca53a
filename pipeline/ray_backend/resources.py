"""What one unit of work asks of a node, what a node (or a node type) offers, and the one fit rule.

Plain values, no Ray: every other module of the backend imports this one, and it imports none of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

# the options that set a worker's request, in each command that has them
FEWER_CPUS_FIX = "ask for fewer CPUs per task (--train-cpus, --eval-cpus)"
NO_GPU_FIX = "ask for no GPU (--train-gpus 0, --eval-gpus 0) or use a cluster with GPUs"


@dataclass(frozen=True)
class Resources:
    """What one unit of work (a training pack or an evaluation range) asks of a node."""

    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.cpus < 0 or self.gpus < 0:
            raise ValueError(f"resources must be >= 0, got {self.cpus} CPU and {self.gpus} GPU")

    def __str__(self) -> str:
        return f"{self.cpus:g} CPU and {self.gpus:g} GPU"

    @property
    def bundle(self) -> dict[str, float]:
        """The request as a resource bundle (what the autoscaler is asked for)."""
        return {k: v for k, v in (("CPU", self.cpus), ("GPU", self.gpus)) if v}


def check_gpus(gpus: float | None, option: str) -> None:
    """Refuse a GPU request Ray cannot place reliably: a whole number, or a fraction 1/n (two runs of
    a quarter each on one GPU). Other fractions fail to schedule across nodes, and an autoscaler that
    sums free GPU may never scale up for them (ray-project/ray#52133, #39987); a pack uses a whole GPU."""
    if gpus is None or gpus == int(gpus):
        return
    f = Fraction(gpus).limit_denominator(64)
    if not (0 < gpus < 1 and f.numerator == 1 and abs(float(f) - gpus) < 1e-9):
        raise ValueError(f"{option} {gpus:g} is a fraction Ray cannot place reliably; ask for whole GPUs or 1/n (0.5, 0.25): a GPU task trains a whole pack")


@dataclass(frozen=True)
class NodeType:
    """A kind of worker node the cluster's autoscaler can launch, and what one such node offers."""

    name: str
    resources: Mapping[str, float]
    max_workers: int


def fits(res: Resources, offer: Mapping[str, float]) -> bool:
    """The one fit rule: a request fits a node when its CPUs and its GPUs fit there together."""
    return offer.get("CPU", 0) >= res.cpus and offer.get("GPU", 0) >= res.gpus


def per_node(res: Resources, offer: Mapping[str, float]) -> int:
    """How many units of ``res`` one offer (a node, a node type or the whole cluster) runs at once."""
    by_cpu = int(offer.get("CPU", 0) // res.cpus) if res.cpus else 1 << 30
    by_gpu = int(offer.get("GPU", 0) // res.gpus) if res.gpus else by_cpu
    return min(by_cpu, by_gpu)


def fitting_types(res: Resources, types: list[NodeType] | None) -> list[NodeType]:
    """The node types of ``types`` that fit one unit of ``res``, the smallest first (fewest GPUs,
    then CPUs): the one a request for ``res`` makes the autoscaler launch."""
    return sorted((t for t in types or [] if fits(res, t.resources)), key=lambda t: (t.resources.get("GPU", 0), t.resources.get("CPU", 0)))


def launchable_slots(res: Resources, types: list[NodeType], cap: int) -> int:
    """Units of ``res`` the node types the autoscaler can launch would run at their ``max_workers``
    (a negative count, Ray's "unlimited", as many as ``cap``). A request with no GPU does not count GPU
    types: CPU work must not make the autoscaler launch GPU nodes."""
    more = 0
    for t in types:
        if res.gpus == 0 and t.resources.get("GPU", 0) > 0:
            continue
        per = per_node(res, t.resources)
        more += cap if t.max_workers < 0 and per > 0 else max(t.max_workers, 0) * per
    return more
