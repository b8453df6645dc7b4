import pytest
import torch
from torch import nn

import selkernels
from selkernels import reference


class SmallNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.block2(self.block1(x)).mean((2, 3)))


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("alpha", [-2.0, 0.5])
def test_drop_in_equals_paper_code(alpha):
    torch.manual_seed(0)
    model = SmallNet().double()
    x = torch.randn(20, 1, 6, 6, dtype=torch.float64)
    y = torch.arange(20) % 5

    # The published way: keep block outputs with hooks, loop over classes per layer.
    acts = []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o)) for m in (model.block1, model.block2)]
    loss_ref = nn.functional.cross_entropy(model(x), y) + reference.paper_selectivity_penalty(acts, y, alpha)
    loss_ref.backward()
    grads_ref = _grads(model)
    for h in hooks:
        h.remove()
    model.zero_grad()

    with selkernels.SelectivityRegularizer([model.block1, model.block2], alpha, num_classes=5) as reg:
        loss = nn.functional.cross_entropy(model(x), y) + reg.penalty(y)
        loss.backward()
        assert reg.last_layer_si.shape == (2,)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-12)
    for g, g_ref in zip(_grads(model), grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_sign_convention_negative_alpha_lowers_selectivity():
    torch.manual_seed(1)
    model = SmallNet()
    x = torch.randn(40, 1, 6, 6)
    y = torch.arange(40) % 5
    reg = selkernels.SelectivityRegularizer({"b1": model.block1, "b2": model.block2}, alpha=-1.0, num_classes=5)
    model(x)
    before = reg.layer_selectivity(y).mean().item()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        model(x)
        reg.penalty(y).backward()
        opt.step()
    model(x)
    assert reg.layer_selectivity(y).mean().item() < before
    reg.remove()


def test_releases_activations_and_hooks():
    model = SmallNet()
    reg = selkernels.SelectivityRegularizer([model.block1], 1.0, 5)
    y = torch.arange(8) % 5
    model(torch.randn(8, 1, 4, 4))
    reg.penalty(y)
    assert all(o is None for o in reg._outputs)
    with pytest.raises(RuntimeError, match="produced no output"):
        reg.penalty(y)
    reg.remove()
    model(torch.randn(8, 1, 4, 4))
    assert all(o is None for o in reg._outputs)


def test_eval_mode_no_grad():
    model = SmallNet().eval()
    reg = selkernels.SelectivityRegularizer([model.block1, model.block2], 1.0, 5)
    with torch.no_grad():
        model(torch.randn(10, 1, 4, 4))
        value = reg.penalty(torch.arange(10) % 5)
    assert torch.isfinite(value) and not value.requires_grad


def test_bad_modules():
    with pytest.raises(TypeError, match="modules must be"):
        selkernels.SelectivityRegularizer([], 1.0, 5)
    with pytest.raises(ValueError, match="num_classes"):
        selkernels.SelectivityRegularizer(nn.ReLU(), 1.0, 0)


class _Residual(nn.Module):
    """Two residual blocks: each block output feeds the next block's branch and its skip add, so its
    gradient is the sum of dense contributions, as in a ResNet."""

    def __init__(self, c=4, classes=3):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(3))
        self.outs = nn.ModuleList(nn.ReLU() for _ in range(3))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        for conv, out in zip(self.convs, self.outs):
            x = out(conv(x) + x)
        return self.head(x.mean((2, 3)))


def test_si_gradient_is_added_in_place_and_exact():
    """The SI gradient reaches each block output's dense gradient by an in-place add (no
    output-sized out-of-place aten::add in the backward), and the gradients equal the published
    computation's in fp64."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = _Residual().double()
    x = torch.rand(12, 4, 5, 5, dtype=torch.float64)
    y = torch.arange(12) % 3
    hooked = list(model.outs[:2])

    acts = []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o)) for m in hooked]
    (nn.functional.cross_entropy(model(x), y) + reference.paper_selectivity_penalty(acts, y, -1.0)).backward()
    grads_ref = [p.grad.clone() for p in model.parameters()]
    for h in hooks:
        h.remove()
    model.zero_grad()

    with selkernels.SelectivityRegularizer(hooked, alpha=-1.0, num_classes=3) as reg:
        loss = nn.functional.cross_entropy(model(x), y) + reg.penalty(y)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            loss.backward()
    out_shape = list(x.shape)
    adds = {
        name: sum(
            e.name == name and bool(e.input_shapes) and list(e.input_shapes[0]) == out_shape for e in prof.events()
        )
        for name in ("aten::add", "aten::add_")
    }
    assert adds["aten::add"] == 0, adds
    assert adds["aten::add_"] >= len(hooked), adds  # one per hooked output at least (plus the skip adds)
    for got, ref in zip(model.parameters(), grads_ref):
        torch.testing.assert_close(got.grad, ref, rtol=1e-10, atol=1e-12)


def test_one_segmentation_per_step_serves_the_regularizer_and_the_covariance():
    # labels segmented once: the penalty and the per-class covariance of the same step take it
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU())
    reg = selkernels.SelectivityRegularizer([model[1], model[3]], 0.5, 4)
    x, labels = torch.randn(12, 3, 8, 8), torch.randint(0, 4, (12,))
    seg = selkernels.segment_labels(labels, 4)
    stats_seg = selkernels.StreamingCovariance(5, num_classes=4)
    stats_labels = selkernels.StreamingCovariance(5, num_classes=4)
    out = model(x)
    with_seg = reg.penalty(seg)
    stats_seg.update(out, seg)
    out = model(x)
    with_labels = reg.penalty(labels)
    stats_labels.update(out, labels)
    torch.testing.assert_close(with_seg, with_labels, rtol=0, atol=0)
    assert torch.equal(stats_seg.M2, stats_labels.M2) and torch.equal(stats_seg.count, stats_labels.count)


def test_compiled_penalty_keeps_the_hooked_outputs_inside_the_graph():
    # The hooks' list is emptied in place: no hooked output may leave the compiled graph (an output
    # that requires grad gets a zero gradient filled and added in the backward, a pass per layer).
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    reg = selkernels.SelectivityRegularizer([model[1], model[3]], 0.5, 4)
    x, labels = torch.randn(12, 3, 8, 8), torch.randint(0, 4, (12,))
    model(x)
    graph_outputs = []

    def backend(gm, example_inputs):
        outs = gm.graph.output_node().args[0]
        graph_outputs.append(sum(bool(getattr(n.meta.get("example_value"), "requires_grad", False)) for n in outs))
        return gm

    def loss_fn(x, labels):
        return nn.functional.cross_entropy(model(x), labels) + reg.penalty(labels)

    loss = torch.compile(loss_fn, backend=backend, fullgraph=True)(x, labels)
    loss.backward()
    assert graph_outputs == [1]  # the loss alone requires grad (last_layer_si leaves detached)
    assert reg._outputs == [None, None]
