import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def data_dir():
    """The fetched MNIST (``make test`` fetches it first)."""
    from pathlib import Path

    return Path(os.environ.get("IWAE_DATA_DIR", Path(__file__).resolve().parents[1] / "data")).absolute()


@pytest.fixture(scope="session")
def mnist_dir():
    d = data_dir()
    if not (d / "mnist.npz").exists():
        pytest.fail(f"MNIST is not in {d}: run `make data` (make test does it)")
    return d


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session (start-up costs ~7 s), loopback only."""
    import ray

    from pipeline.ray_backend import cluster

    c = cluster.connect(num_cpus=2)  # the CLI's own embedded start-up, loopback only
    yield ray
    c.shutdown()
