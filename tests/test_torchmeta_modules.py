"""metalearn.torchmeta.modules: torchmeta's MetaModules.

Every Meta layer is checked against its ``torch.nn`` layer: with ``params=None`` (same outputs and
gradients as the nn layer with the same weights) and with a ``params`` dict (same as
``torch.func.functional_call`` of the nn layer with those tensors), in float64. Second-order MAML
through ``gradient_update_parameters`` is checked against finite differences and torch.func; the
rest checks torchmeta's naming rules, BatchNorm's running statistics, DataParallel on CPU, and that
a small MAML run with these modules learns.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalearn.torchmeta import InvalidArgument
from metalearn.torchmeta.modules import (
    DataParallel, MetaBatchNorm1d, MetaBatchNorm2d, MetaBatchNorm3d, MetaBilinear, MetaConv1d, MetaConv2d,
    MetaConv3d, MetaEmbedding, MetaEmbeddingBag, MetaLayerNorm, MetaLinear, MetaModule, MetaMultiheadAttention,
    MetaSequential,
)
from metalearn.torchmeta.utils.gradient_based import gradient_update_parameters

D = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These ops are tiny: a second intra-op thread only spins, and on a shared machine that costs much.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rand(*shape, grad=True):
    return torch.randn(*shape, dtype=D, requires_grad=grad)


def _ids():
    return torch.tensor([[1, 0, 3, 5], [2, 2, 6, 0]])


# (id, Meta class, nn class, constructor args, constructor kwargs, inputs maker, forward kwargs)
LAYERS = [
    ("linear", MetaLinear, nn.Linear, (5, 3), {}, lambda: (_rand(4, 5),), {}),
    ("linear-nobias", MetaLinear, nn.Linear, (5, 3), {"bias": False}, lambda: (_rand(2, 4, 5),), {}),
    ("bilinear", MetaBilinear, nn.Bilinear, (3, 4, 2), {}, lambda: (_rand(5, 3), _rand(5, 4)), {}),
    ("conv1d", MetaConv1d, nn.Conv1d, (2, 4, 3), {"stride": 2, "padding": 1}, lambda: (_rand(3, 2, 9),), {}),
    ("conv1d-same-circular", MetaConv1d, nn.Conv1d, (2, 3, 4), {"padding": "same", "padding_mode": "circular"},
     lambda: (_rand(3, 2, 9),), {}),
    ("conv2d", MetaConv2d, nn.Conv2d, (4, 6, 3), {"padding": 2, "dilation": 2, "groups": 2},
     lambda: (_rand(2, 4, 7, 6),), {}),
    *[(f"conv2d-{mode}", MetaConv2d, nn.Conv2d, (2, 3, 3), {"padding": (1, 2), "padding_mode": mode},
       lambda: (_rand(2, 2, 6, 5),), {}) for mode in ("reflect", "replicate", "circular")],
    ("conv3d", MetaConv3d, nn.Conv3d, (2, 3, 2), {"padding": 1, "padding_mode": "replicate", "bias": False},
     lambda: (_rand(2, 2, 4, 3, 4),), {}),
    ("batchnorm1d", MetaBatchNorm1d, nn.BatchNorm1d, (3,), {}, lambda: (_rand(6, 3, 4),), {}),
    ("batchnorm2d", MetaBatchNorm2d, nn.BatchNorm2d, (3,), {"momentum": None}, lambda: (_rand(4, 3, 2, 3),), {}),
    ("batchnorm2d-untracked", MetaBatchNorm2d, nn.BatchNorm2d, (3,), {"track_running_stats": False},
     lambda: (_rand(4, 3, 2, 3),), {}),
    ("batchnorm3d", MetaBatchNorm3d, nn.BatchNorm3d, (2,), {}, lambda: (_rand(3, 2, 2, 2, 3),), {}),
    ("layernorm", MetaLayerNorm, nn.LayerNorm, ((3, 4),), {}, lambda: (_rand(2, 5, 3, 4),), {}),
    ("layernorm-nobias", MetaLayerNorm, nn.LayerNorm, (4,), {"bias": False}, lambda: (_rand(3, 4),), {}),
    ("embedding", MetaEmbedding, nn.Embedding, (7, 3), {"padding_idx": 0}, lambda: (_ids(),), {}),
    ("embeddingbag-sum", MetaEmbeddingBag, nn.EmbeddingBag, (7, 3), {"mode": "sum"},
     lambda: (torch.tensor([1, 4, 4, 0, 6, 2]), torch.tensor([0, 2, 5]), _rand(6)), {}),
    ("embeddingbag-max", MetaEmbeddingBag, nn.EmbeddingBag, (7, 3), {"mode": "max", "padding_idx": 2},
     lambda: (_ids(),), {}),
    ("mha", MetaMultiheadAttention, nn.MultiheadAttention, (6, 2), {},
     lambda: (_rand(4, 3, 6), _rand(5, 3, 6), _rand(5, 3, 6)), {}),
    ("mha-kdim-vdim-batch-first", MetaMultiheadAttention, nn.MultiheadAttention, (6, 3),
     {"kdim": 4, "vdim": 5, "batch_first": True},
     lambda: (_rand(2, 4, 6), _rand(2, 3, 4), _rand(2, 3, 5)),
     {"key_padding_mask": torch.tensor([[False, False, True], [False, False, False]]), "average_attn_weights": False}),
    ("mha-biaskv-zeroattn-mask", MetaMultiheadAttention, nn.MultiheadAttention, (4, 2),
     {"add_bias_kv": True, "add_zero_attn": True, "bias": False},
     lambda: (_rand(3, 2, 4), _rand(4, 2, 4), _rand(4, 2, 4)),
     {"attn_mask": torch.triu(torch.ones(3, 4, dtype=torch.bool), diagonal=2), "need_weights": False}),
]


def _tensors(out):
    return [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]


def _scalar(out):
    """A loss mixing every output element, so each one's gradient is checked."""
    generator = torch.Generator().manual_seed(1)
    return sum((t * torch.randn(t.shape, dtype=D, generator=generator)).sum() for t in _tensors(out))


def _check_same(out, ref, wrt, ref_wrt):
    for a, b in zip(_tensors(out), _tensors(ref), strict=True):
        torch.testing.assert_close(a, b, **TOL)
    grads = torch.autograd.grad(_scalar(out), wrt, allow_unused=True)
    ref_grads = torch.autograd.grad(_scalar(ref), ref_wrt, allow_unused=True)
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, **TOL)


@pytest.mark.parametrize("case", LAYERS, ids=[case[0] for case in LAYERS])
def test_meta_layer_matches_its_nn_layer_with_own_and_given_params(case):
    _, meta_cls, nn_cls, args, kwargs, make_inputs, forward_kwargs = case
    # Same seed, same initial weights: the Meta layer is the nn layer plus params.
    torch.manual_seed(0)
    meta = meta_cls(*args, **kwargs, dtype=D)
    torch.manual_seed(0)
    ref = nn_cls(*args, **kwargs, dtype=D)
    assert list(meta.state_dict()) == list(ref.state_dict())
    for (name, a), b in zip(meta.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    assert [n for n, _ in meta.meta_named_parameters()] == [n for n, _ in ref.named_parameters()]

    torch.manual_seed(1)
    inputs = make_inputs()
    float_inputs = [x for x in inputs if x.is_floating_point()]
    _check_same(meta(*inputs, **forward_kwargs), ref(*inputs, **forward_kwargs),
                [*meta.parameters(), *float_inputs], [*ref.parameters(), *float_inputs])

    params = OrderedDict((name, (p.detach() + 0.3 * torch.randn_like(p)).requires_grad_())
                         for name, p in meta.meta_named_parameters())
    out = meta(*inputs, **forward_kwargs, params=params)
    expected = functional_call(ref, dict(params), inputs, forward_kwargs)
    _check_same(out, expected, [*params.values(), *float_inputs], [*params.values(), *float_inputs])
    # Buffers (running statistics) followed the same updates in both.
    for (name, a), b in zip(meta.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=name)
    # With params given, the module's own parameters take no part.
    out = meta(*inputs, **forward_kwargs, params=params)
    assert all(g is None for g in torch.autograd.grad(_scalar(out), list(meta.parameters()), allow_unused=True))


def test_multihead_attention_self_attention_and_eval_fast_path_agree_with_nn():
    torch.manual_seed(0)
    meta = MetaMultiheadAttention(8, 2, batch_first=True, dtype=D)
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=True, dtype=D)
    x = _rand(3, 5, 8)
    # Self-attention (query is key is value), batch_first, training mode.
    _check_same(meta(x, x, x), ref(x, x, x), [*meta.parameters(), x], [*ref.parameters(), x])
    assert isinstance(meta.out_proj, MetaLinear)
    assert [n for n, _ in meta.meta_named_parameters()] == ["in_proj_weight", "in_proj_bias", "out_proj.weight",
                                                           "out_proj.bias"]
    # In eval mode without grad nn may take its fused fast path; the values agree.
    meta.eval()
    ref.eval()
    with torch.no_grad():
        for a, b in zip(meta(x, x, x), ref(x, x, x)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # params holding only some entries: the missing ones are the module's own.
    w = meta.in_proj_weight.detach() * 2
    torch.testing.assert_close(meta(x, x, x, params={"in_proj_weight": w})[0],
                               functional_call(ref, {"in_proj_weight": w}, (x, x, x))[0], **TOL)


class TinyNet(MetaModule):
    """A user's torchmeta-style model: its own parameter, a MetaSequential and a MetaLinear."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=D))
        self.features = MetaSequential(MetaConv2d(1, 3, 3, padding=1, dtype=D), MetaBatchNorm2d(3, dtype=D),
                                       nn.Tanh(), nn.AvgPool2d(2), nn.Flatten())
        self.classifier = MetaLinear(12, 2, dtype=D)

    def forward(self, x, params=None):
        scale = self.scale if params is None else params.get("scale", self.scale)
        features = self.features(x * scale, params=self.get_subdict(params, "features"))
        return self.classifier(features, params=self.get_subdict(params, "classifier"))


def test_meta_named_parameters_and_get_subdict_follow_torchmeta():
    model = MetaSequential(MetaLinear(3, 4), nn.Linear(4, 4), MetaSequential(nn.ReLU(), MetaLinear(4, 2)))
    assert [n for n, _ in model.meta_named_parameters()] == ["0.weight", "0.bias", "2.1.weight", "2.1.bias"]
    assert [n for n, _ in model.meta_named_parameters(prefix="net")][0] == "net.0.weight"
    assert list(model.meta_parameters()) == [p for _, p in model.meta_named_parameters()]
    assert list(model.meta_named_parameters(recurse=False)) == []
    assert [n for n, _ in model[0].meta_named_parameters(recurse=False)] == ["weight", "bias"]
    tied = MetaSequential(MetaLinear(2, 2), MetaLinear(2, 2))
    tied[1].weight = tied[0].weight
    assert [n for n, _ in tied.meta_named_parameters()] == [n for n, _ in tied.named_parameters()] == [
        "0.weight", "0.bias", "1.bias"]

    net = TinyNet()
    assert [n for n, _ in net.meta_named_parameters()] == [
        "scale", "features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
        "classifier.weight", "classifier.bias"]
    params = OrderedDict([("features.0.weight", 1), ("features.10.bias", 2), ("features2.x", 3), ("scale", 4)])
    assert net.get_subdict(None, "features") is None
    assert net.get_subdict(params) == params
    sub = net.get_subdict(params, "features")
    assert isinstance(sub, OrderedDict) and list(sub.items()) == [("0.weight", 1), ("10.bias", 2)]
    assert net.get_subdict(sub, "0") == {"weight": 1}
    with pytest.warns(UserWarning, match="no entry for the submodule 'classifier'"):
        assert net.get_subdict(params, "classifier") is None


def test_user_meta_module_runs_functionally_and_partial_params_fall_back_to_its_own():
    torch.manual_seed(0)
    net = TinyNet()
    x = _rand(4, 1, 4, 4, grad=False)
    params = OrderedDict((n, (p.detach() + 0.2 * torch.randn_like(p)).requires_grad_())
                         for n, p in net.meta_named_parameters())
    out = net(x, params=params)
    # The reference: net's forward with params=None and its parameters swapped for the tensors.
    torch.testing.assert_close(out, functional_call(net, dict(params), (x,)), **TOL)
    # ANIL-style: only the classifier adapted; the rest (no entry) runs with the module's own parameters.
    head = OrderedDict((n, p) for n, p in params.items() if n.startswith("classifier."))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        partial = net(x, params=head)
    torch.testing.assert_close(partial, functional_call(net, dict(head), (x,)), **TOL)
    # One entry of a layer missing: that layer uses its own tensor for it (torchmeta would drop it).
    only_weight = {"classifier.weight": params["classifier.weight"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(net(x, params=only_weight), functional_call(net, only_weight, (x,)), **TOL)


@pytest.mark.parametrize("momentum", [0.3, None])
def test_batchnorm_running_statistics_match_nn_batchnorm2d(momentum):
    torch.manual_seed(0)
    meta, ref = MetaBatchNorm2d(3, momentum=momentum, dtype=D), nn.BatchNorm2d(3, momentum=momentum, dtype=D)
    params = {"weight": _rand(3), "bias": _rand(3)}
    for step in range(4):
        x = torch.randn(5, 3, 2, 2, dtype=D) * (step + 1) + step
        torch.testing.assert_close(meta(x, params=params) if step % 2 else meta(x),
                                   functional_call(ref, params, (x,)) if step % 2 else ref(x), **TOL)
    assert int(meta.num_batches_tracked) == int(ref.num_batches_tracked) == 4
    torch.testing.assert_close(meta.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(meta.running_var, ref.running_var, **TOL)
    meta.eval()
    ref.eval()
    x = torch.randn(2, 3, 2, 2, dtype=D)
    running = (meta.running_mean.clone(), meta.running_var.clone())
    torch.testing.assert_close(meta(x, params=params), functional_call(ref, params, (x,)), **TOL)
    assert torch.equal(meta.running_mean, running[0]) and torch.equal(meta.running_var, running[1])
    assert int(meta.num_batches_tracked) == 4

    # Tracking switched off after construction: nn leaves the buffers alone in training, uses them in eval.
    meta.track_running_stats = ref.track_running_stats = False
    meta.train()
    ref.train()
    torch.testing.assert_close(meta(x, params=params), functional_call(ref, params, (x,)), **TOL)
    assert torch.equal(meta.running_mean, running[0]) and int(meta.num_batches_tracked) == 4
    meta.eval()
    ref.eval()
    torch.testing.assert_close(meta(x), ref(x), **TOL)

    # Untracked, and affine=False: batch statistics in eval mode too, no buffers.
    untracked = MetaBatchNorm2d(3, affine=False, track_running_stats=False, dtype=D).eval()
    assert untracked.running_mean is None and list(untracked.meta_named_parameters()) == []
    torch.testing.assert_close(untracked(x, params={}), F.batch_norm(x, None, None, training=True), **TOL)
    with pytest.raises(ValueError, match="expected 4D input"):
        meta(torch.zeros(2, 3, dtype=D))


def _maml_model():
    return MetaSequential(OrderedDict([
        ("conv", MetaConv2d(1, 2, 3, dtype=D)), ("norm", MetaBatchNorm2d(2, track_running_stats=False, dtype=D)), ("act", nn.Tanh()),
        ("flat", nn.Flatten()), ("head", MetaLinear(12, 2, dtype=D))]))


def _maml_outer_loss(model, params, first_order=False):
    """Two inner steps on a support set, then the query loss of the adapted parameters."""
    generator = torch.Generator().manual_seed(3)
    support, query = (torch.randn(4, 1, 5, 4, dtype=D, generator=generator) for _ in range(2))
    support_y, query_y = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 0, 0, 1])
    for _ in range(2):
        inner = F.cross_entropy(model(support, params=params), support_y)
        params = gradient_update_parameters(model, inner, params=params, step_size=0.4, first_order=first_order)
    return F.cross_entropy(model(query, params=params), query_y)


def test_second_order_maml_gradient_matches_finite_differences_and_torch_func():
    torch.manual_seed(0)
    model = _maml_model()
    names = [n for n, _ in model.meta_named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in model.meta_parameters()]

    def outer(*tensors):
        return _maml_outer_loss(model, OrderedDict(zip(names, tensors)))

    # Second-order gradients (through both inner steps) against central finite differences.
    assert torch.autograd.gradcheck(outer, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)

    # The same gradient from torch.func, with the inner steps written with torch.func.grad.
    def func_outer(p):
        generator = torch.Generator().manual_seed(3)
        support, query = (torch.randn(4, 1, 5, 4, dtype=D, generator=generator) for _ in range(2))
        support_y, query_y = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 0, 0, 1])
        for _ in range(2):
            g = torch.func.grad(lambda q: F.cross_entropy(functional_call(model, q, (support,)), support_y))(p)
            p = {n: p[n] - 0.4 * g[n] for n in p}
        return F.cross_entropy(functional_call(model, p, (query,)), query_y)

    start = dict(zip(names, (t.detach() for t in leaves)))
    reference = torch.func.grad(func_outer)(start)
    got = torch.autograd.grad(outer(*leaves), leaves)
    for name, g in zip(names, got):
        torch.testing.assert_close(g, reference[name], **TOL)

    # first_order drops the second-order terms: a different gradient, equal to differentiating only the last step.
    first = torch.autograd.grad(_maml_outer_loss(model, OrderedDict(zip(names, leaves)), first_order=True), leaves)
    assert any(not torch.allclose(a, b, rtol=1e-4) for a, b in zip(first, got))


def test_gradient_update_parameters_names_steps_and_plain_modules():
    torch.manual_seed(0)
    model = MetaSequential(MetaLinear(3, 4, dtype=D), nn.Linear(4, 2, dtype=D))
    x = _rand(5, 3, grad=False)
    loss = model(x).pow(2).sum()
    updated = gradient_update_parameters(model, loss, step_size=0.1)
    assert isinstance(updated, OrderedDict) and list(updated) == ["0.weight", "0.bias"]
    grads = torch.autograd.grad(model(x).pow(2).sum(), [model[0].weight, model[0].bias])
    torch.testing.assert_close(updated["0.weight"], model[0].weight - 0.1 * grads[0], **TOL)
    assert updated["0.weight"].requires_grad  # second order by default: the graph is kept

    # A dict of per-parameter step sizes (tensors allowed: Meta-SGD), and its missing entries refused.
    sizes = {"0.weight": torch.tensor(0.2, dtype=D, requires_grad=True), "0.bias": 0.0}
    updated = gradient_update_parameters(model, model(x).pow(2).sum(), step_size=sizes)
    torch.testing.assert_close(updated["0.weight"], model[0].weight - 0.2 * grads[0], **TOL)
    assert torch.equal(updated["0.bias"], model[0].bias)
    torch.autograd.grad(updated["0.weight"].sum(), sizes["0.weight"])  # the step size is differentiable
    with pytest.raises(InvalidArgument, match="'0.bias'"):
        gradient_update_parameters(model, model(x).sum(), step_size={"0.weight": 0.1})

    # A plain nn.Module: all its parameters, to use through functional_call.
    plain = nn.Sequential(nn.Linear(3, 2, dtype=D))
    updated = gradient_update_parameters(plain, plain(x).sum(), step_size=0.5, first_order=True)
    assert list(updated) == ["0.weight", "0.bias"]
    # First order: the step's gradient is a constant, so d(updated)/d(parameter) is the identity.
    (g,) = torch.autograd.grad(updated["0.weight"].sum(), plain[0].weight)
    assert torch.equal(g, torch.ones_like(g))
    # A parameter the loss does not use comes back unchanged.
    unused = gradient_update_parameters(model, model[0](x).sum())
    assert list(unused) == ["0.weight", "0.bias"]


def test_data_parallel_without_accelerators_calls_the_module_with_params():
    torch.manual_seed(0)
    net = TinyNet()
    model = DataParallel(net)
    assert isinstance(model, nn.DataParallel) and isinstance(model, MetaModule)
    x = _rand(4, 1, 4, 4, grad=False)
    torch.testing.assert_close(model(x), net(x), **TOL)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 1, 0]))
    params = gradient_update_parameters(model, loss, step_size=0.3)
    assert next(iter(params)) == "module.scale"
    stripped = OrderedDict((n[len("module."):], p) for n, p in params.items())
    out = model(x, params=params)
    torch.testing.assert_close(out, net(x, params=stripped), **TOL)
    torch.testing.assert_close(model(x, params=stripped), out, **TOL)
    (g,) = torch.autograd.grad(out.sum(), net.scale, retain_graph=True)
    (ref,) = torch.autograd.grad(net(x, params=stripped).sum(), net.scale)
    torch.testing.assert_close(g, ref, **TOL)


def _task(generator, ways=5, shots=5, queries=5):
    """A task of ``ways`` random 8x8 prototypes; samples are a prototype plus noise, labelled by prototype."""
    prototypes = torch.randn(ways, 1, 8, 8, generator=generator)

    def draw(n):
        labels = torch.arange(ways).repeat_interleave(n)
        return prototypes[labels] + 0.6 * torch.randn(len(labels), 1, 8, 8, generator=generator), labels

    return draw(shots), draw(queries)


def test_small_maml_run_learns_above_chance():
    torch.manual_seed(0)
    hidden, ways = 16, 5
    model = MetaSequential(
        MetaConv2d(1, hidden, 3, padding=1), MetaBatchNorm2d(hidden, track_running_stats=False), nn.ReLU(),
        nn.MaxPool2d(2),
        MetaConv2d(hidden, hidden, 3, padding=1), MetaBatchNorm2d(hidden, track_running_stats=False), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), MetaLinear(hidden * 4, ways))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)

    def adapted_accuracy(tasks, train):
        total_loss, correct = 0.0, 0.0
        for (support, support_y), (query, query_y) in tasks:
            params = gradient_update_parameters(model, F.cross_entropy(model(support), support_y), step_size=0.4,
                                                first_order=not train)
            logits = model(query, params=params)
            total_loss = total_loss + F.cross_entropy(logits, query_y)
            correct += (logits.argmax(1) == query_y).double().mean().item()
        return total_loss / len(tasks), correct / len(tasks)

    test_generator = torch.Generator().manual_seed(123)
    test_tasks = [_task(test_generator) for _ in range(20)]
    before = adapted_accuracy(test_tasks, train=False)[1]
    generator = torch.Generator().manual_seed(7)
    for _ in range(30):
        optimizer.zero_grad()
        loss, _ = adapted_accuracy([_task(generator) for _ in range(3)], train=True)
        loss.backward()
        optimizer.step()
    after = adapted_accuracy(test_tasks, train=False)[1]
    # Chance is 1/5; one adaptation step from the initial weights already gets some of the way.
    assert after > 0.6 and after > before + 0.2, (before, after)
