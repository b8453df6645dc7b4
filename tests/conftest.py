import pytest
import torch

# The one way a test asks for a GPU: `requires_cuda` on a CUDA-only test, the `device` fixture on a
# test whose body runs on every device (CPU always; CUDA where a GPU is present, a clean skip else).
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device a test body runs on: "cpu", then "cuda" (skipped without a GPU)."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_batch(n=24, c=6, spatial=(3, 4), k=5, dtype=torch.float64, relu=True, seed=0, device="cpu"):
    """Activations and labels covering every class at least once when n >= k (drawn on the CPU, so
    every device gets the same numbers, then moved to ``device``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c) + tuple(spatial), generator=g, dtype=torch.float64)
    x = (x.relu() if relu else x) + 0.1
    labels = torch.randint(0, k, (n,), generator=g)
    labels[: min(n, k)] = torch.arange(min(n, k))
    return x.to(dtype).to(device), labels.to(device)
