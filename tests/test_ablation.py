"""selkernels.analysis.ablation_curve: accuracy as the most selective (or random) units are zeroed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selkernels import ClassSelectivity
from selkernels.analysis import ablation_curve

K = 4


class TokenNet(nn.Module):
    """[N, 3, 5] tokens -> hidden [N, 3, 8] (ReLU) -> mean over tokens -> logits."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 8)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, K)

    def forward(self, x):
        return self.head(self.act(self.fc(x)).mean(1))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, K)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean((2, 3)))


def _loader(shape, seed=0, batches=3, n=16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((n,) + shape, generator=g), torch.randint(0, K, (n,), generator=g)) for _ in range(batches)]


def _accuracy_with_zeroed(model, loader, units, unit_dim):
    """Accuracy with the given units of model.act's output zeroed, by editing the forward."""

    def hook(m, i, out):
        out = out.clone()
        idx = [slice(None)] * out.dim()
        idx[unit_dim] = units
        out[tuple(idx)] = 0
        return out

    handle = model.act.register_forward_hook(hook)
    try:
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    finally:
        handle.remove()
    return correct / sum(len(y) for _, y in loader)


@pytest.mark.parametrize("net,shape,unit_dim", [(ConvNet, (1, 4, 4), 1), (TokenNet, (3, 5), -1)])
def test_selectivity_order_matches_hand_ablation(net, shape, unit_dim):
    torch.manual_seed(0)
    model = net()
    model.train()
    loader = _loader(shape)
    curve = ablation_curve(model, model.act, loader, unit_dim=unit_dim, fractions=(0, 0.25, 0.5, 1.0))
    assert model.training  # mode restored
    assert not model.act._forward_hooks  # hooks removed
    with ClassSelectivity(model.act, K, unit_dim=unit_dim) as probe, torch.no_grad():
        model.eval()
        for x, y in loader:
            model(x)
            probe.update(y)
    si = probe.compute()[0].si
    torch.testing.assert_close(curve.selectivity, si, rtol=0, atol=0)
    expected_rank = sorted(range(len(si)), key=lambda u: (-float(si[u]), u))
    assert curve.ranking.tolist() == expected_rank
    assert curve.num_ablated == ([0, 2, 3, 6] if unit_dim == 1 else [0, 2, 4, 8])
    for k, acc in zip(curve.num_ablated, curve.accuracy):
        assert acc == pytest.approx(_accuracy_with_zeroed(model, loader, expected_rank[:k], unit_dim))
    assert "accuracy" in curve.table() and len(curve.rows) == 4


def test_random_order_and_plot(tmp_path):
    torch.manual_seed(1)
    model = ConvNet()
    loader = _loader((1, 4, 4), seed=2)
    curve = ablation_curve(model, model.act, loader, order="random", seed=7, fractions=(0.0, 0.5, 1.0))
    assert curve.ranking.tolist() == torch.randperm(6, generator=torch.Generator().manual_seed(7)).tolist()
    assert curve.selectivity is None
    for k, acc in zip(curve.num_ablated, curve.accuracy):
        assert acc == pytest.approx(_accuracy_with_zeroed(model, loader, curve.ranking[:k].tolist(), 1))
    best = ablation_curve(model, model.act, loader, fractions=(0.0, 0.5, 1.0))
    path = tmp_path / "ablation.png"
    best.plot(path, curve)
    assert path.stat().st_size > 1000
    best.write_csv(tmp_path / "ablation.csv")
    assert (tmp_path / "ablation.csv").read_text().startswith("fraction,units_ablated,accuracy")


def test_bad_arguments():
    model = ConvNet()
    loader = _loader((1, 4, 4))
    with pytest.raises(ValueError, match="order"):
        ablation_curve(model, model.act, loader, order="largest")
    with pytest.raises(ValueError, match="fractions"):
        ablation_curve(model, model.act, loader, fractions=(0.5, 1.5))
    with pytest.raises(ValueError, match="submodule"):
        ablation_curve(model, nn.ReLU(), loader)
    with pytest.raises(ValueError, match="unit_dim"):
        ablation_curve(model, model.act, loader, unit_dim=2)
    with pytest.raises(ValueError, match="selectivity"):
        ablation_curve(model, model.act, loader, selectivity=torch.zeros(5))
    with pytest.raises(ValueError, match="no batches"):
        ablation_curve(model, model.act, [])
