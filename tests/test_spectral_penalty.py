"""spectral_penalty: the literal reference, gradcheck, opcheck, torch.compile, edge cases, regularizer."""

import pytest
import torch
from torch import nn

import selkernels
from selkernels import SpectralRegularizer, StreamingCovariance, spectral_penalty
from selkernels.reference import spectral_penalty_reference


def make_inputs(N, D, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    # a spread-out spectrum so that ranks above tau are both above and below the 1/n target
    h = torch.randn(N, D, generator=g, dtype=torch.float64) @ torch.randn(D, D, generator=g, dtype=torch.float64)
    V, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return h.to(dtype).to(device), V.to(device)


@pytest.mark.parametrize("N,D,slope,tau", [(64, 32, 1.0, 10), (20, 48, 1.0, 10), (100, 16, 0.7, 3), (33, 12, 2.0, 0)])
def test_matches_reference_fp64(device, N, D, slope, tau):
    h, V = make_inputs(N, D, N + D, device=device)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    V1, V2 = V.clone().requires_grad_(), V.clone().requires_grad_()
    a = spectral_penalty(h1, V1, slope=slope, tau=tau)
    b = spectral_penalty_reference(h2, V2, slope=slope, tau=tau)
    assert a.item() > 0
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    a.backward()
    b.backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-9, atol=1e-14 * h2.grad.abs().max().item())
    torch.testing.assert_close(V1.grad, V2.grad, rtol=1e-9, atol=1e-12 * V2.grad.abs().max().item())


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_low_precision(device, dtype, rtol):
    h, V = make_inputs(128, 32, 5, device=device)
    h = (h / h.std()).to(dtype)
    a = spectral_penalty(h, V)
    assert a.dtype == torch.float32
    b = spectral_penalty_reference(h.double(), V)
    torch.testing.assert_close(a.double(), b, rtol=rtol, atol=0)
    hg = h.clone().requires_grad_()
    spectral_penalty(hg, V).backward()
    assert hg.grad.dtype == dtype
    hr = h.double().requires_grad_()
    spectral_penalty_reference(hr, V).backward()
    err = (hg.grad.double() - hr.grad).norm() / hr.grad.norm()
    assert err < 10 * rtol


def test_gradcheck_fp64(device):
    # The anchor lambda_hat[tau] is a constant by definition (detached), so finite differences see
    # it move unless the perturbation leaves it fixed: perturb h orthogonally to the anchor
    # direction v = V[:, a], and V everywhere but its anchor column.
    h0, V0 = make_inputs(14, 10, 7, device=device)
    h0 = h0 / h0.std()
    tau = 2
    lam = torch.diagonal(V0.T @ torch.cov(h0.T) @ V0)  # the projected variances, by definition
    a = int(torch.sort(lam, descending=True, stable=True).indices[tau])
    v = V0[:, a : a + 1]
    col_mask = torch.ones(10, dtype=torch.float64, device=device)
    col_mask[a] = 0

    def f(dh, dV):
        return spectral_penalty(h0 + dh - (dh @ v) @ v.T, V0 + dV * col_mask, tau=tau)

    dh = torch.zeros_like(h0, requires_grad=True)
    dV = torch.zeros_like(V0, requires_grad=True)
    assert f(dh, dV).item() > 0
    assert torch.autograd.gradcheck(f, (dh, dV))


def test_opcheck(device):
    h, V = make_inputs(24, 16, 8, device=device)
    h.requires_grad_()
    for args in ((h, V, 1.0, 3), (h.float().detach(), V.float(), 0.5, 10)):
        torch.library.opcheck(torch.ops.selkernels.spectral_penalty, args)
    _, P, grad_lam = torch.ops.selkernels.spectral_penalty(h.detach(), V, 1.0, 3)
    torch.library.opcheck(
        torch.ops.selkernels.spectral_penalty_backward,
        (torch.tensor(1.0, dtype=torch.float64, device=device), P, grad_lam, V, torch.float32),
    )
    torch.library.opcheck(
        torch.ops.selkernels.spectral_penalty_backward_basis,
        (torch.tensor(1.0, dtype=torch.float64, device=device), h.detach(), P, grad_lam),
    )


def test_torch_compile_fullgraph():
    h, V = make_inputs(32, 16, 9)
    f = torch.compile(lambda a, b: spectral_penalty(a * 2, b, tau=3) + a.sum() * 0, fullgraph=True, backend="aot_eager")
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    out = f(h1, V)
    ref = spectral_penalty(h2 * 2, V, tau=3)
    torch.testing.assert_close(out, ref)
    out.backward()
    ref.backward()
    torch.testing.assert_close(h1.grad, h2.grad)


def test_edge_cases_zero_loss_and_gradient():
    h, V = make_inputs(1, 16, 10)
    for hh, VV, tau in (
        (h, V, 3),  # N < 2
        (make_inputs(8, 6, 11)[0], make_inputs(8, 6, 11)[1], 5),  # D <= tau + 1
        (torch.zeros(8, 16, dtype=torch.float64), V, 3),
    ):  # all-zero spectrum
        hh = hh.clone().requires_grad_()
        out = spectral_penalty(hh, VV, tau=tau)
        assert out.item() == 0
        torch.testing.assert_close(out, spectral_penalty_reference(hh, VV, tau=tau).detach())
        out.backward()
        assert not hh.grad.any()
    # a rank-deficient batch (N - 1 = 5 < D = 16): the 11 exactly-zero variances are below the
    # rounding floor and skipped; the 3 ranks in (tau, 5) still count
    h, V = make_inputs(6, 16, 12)
    V = torch.linalg.svd(h - h.mean(0), full_matrices=True).Vh.T  # 5 directions with variance, 11 null
    out = spectral_penalty(h, V, tau=1)
    torch.testing.assert_close(out, spectral_penalty_reference(h, V, tau=1))
    lam = torch.linalg.svdvals(h - h.mean(0))[:5] ** 2 / 5
    gamma = lam[1] * 2 / torch.arange(1, 6, dtype=torch.float64)
    r = lam[2:] / gamma[2:]
    torch.testing.assert_close(out, (((r - 1) ** 2 + torch.relu(r - 1)).sum() / 16))


def test_bad_inputs():
    h, V = make_inputs(8, 6, 13)
    with pytest.raises(TypeError, match="h must be a torch.Tensor"):
        spectral_penalty(h.tolist(), V)
    with pytest.raises(TypeError, match="h must be float"):
        spectral_penalty(h.long(), V)
    with pytest.raises(ValueError, match="h must have shape"):
        spectral_penalty(h[0], V)
    with pytest.raises(ValueError, match="V must have shape"):
        spectral_penalty(h, V[:5])
    with pytest.raises(TypeError, match="V must be a floating"):
        spectral_penalty(h, V.int())
    with pytest.raises(ValueError, match="tau must be >= 0"):
        spectral_penalty(h, V, tau=-1)
    with pytest.raises(TypeError, match="slope"):
        spectral_penalty(h, V, slope=float("nan"))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 24)
        self.out = nn.Linear(24, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_regularizer_matches_reference_pipeline():
    torch.manual_seed(0)
    net = Net().double()
    data = [torch.randn(40, 8, dtype=torch.float64) for _ in range(3)]
    reg = SpectralRegularizer([net.fc1, net.fc2], beta=0.5, tau=4)
    with pytest.raises(RuntimeError, match="refresh_basis"):
        net(data[0])
        reg.penalty()
    net.train()
    bases = reg.refresh_basis(net, [(x, None) for x in data])
    assert net.training
    # the eigenbasis of the whole-data covariance, streamed
    with torch.no_grad():
        acts = torch.cat([net.fc1(x) for x in data])
    stats = StreamingCovariance(32)
    stats.update(acts)
    vals, _ = selkernels.spectrum.eigenvalues(stats.covariance(), eigenvectors=True)
    torch.testing.assert_close(torch.diagonal(bases[0].T @ torch.cov(acts.T) @ bases[0]), vals)
    x = data[0]
    net(x)
    pen = reg.penalty()
    with pytest.raises(RuntimeError, match="produced no output"):
        reg.penalty()
    reg.remove()
    h1 = net.fc1(x)
    h2 = net.fc2(torch.relu(h1))
    ref = 0.5 * (spectral_penalty_reference(h1, bases[0], tau=4) + spectral_penalty_reference(h2, bases[1], tau=4))
    torch.testing.assert_close(pen, ref)
    pen.backward()
    assert net.fc1.weight.grad is not None and net.fc1.weight.grad.abs().sum() > 0
