import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_batch(n=24, c=6, spatial=(3, 4), k=5, dtype=torch.float64, relu=True, seed=0):
    """Activations and labels covering every class at least once when n >= k."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c) + tuple(spatial), generator=g, dtype=torch.float64)
    x = (x.relu() if relu else x) + 0.1
    labels = torch.randint(0, k, (n,), generator=g)
    labels[: min(n, k)] = torch.arange(min(n, k))
    return x.to(dtype), labels
