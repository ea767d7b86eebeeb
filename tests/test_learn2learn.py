"""metalearn.learn2learn: utils (clone/update/detach), algorithms (MAML, MetaSGD, GBML), nn, vision.models.

The algorithms are checked against references written here with ``torch.func.functional_call`` and
``torch.autograd.grad`` in float64, and MAML against metalearn's own MAML on the same TaskBatch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import metalearn.learn2learn as l2l
from metalearn.learn2learn._errors import Unsupported

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread (on a busy 2-core machine torch's default threads spin against each
    other and the training-loop test took 30 s instead of 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(got: dict, want: dict, rtol: float = 1e-8) -> None:
    """Every tensor of ``got`` equals ``want``'s to ``rtol`` of the largest entry of ``want`` (gradients that are
    zero up to rounding, e.g. a conv bias before BatchNorm, make entry-wise ratios meaningless)."""
    assert got.keys() == want.keys()
    scale = max(w.abs().max().item() for w in want.values())
    assert scale > 0
    for k in want:
        assert got[k] is not None, k
        err = (got[k] - want[k]).abs().max().item()
        assert err <= rtol * scale, f"{k}: max abs diff {err:.3g} vs scale {scale:.3g}"


def grads_of(module: nn.Module) -> dict:
    return {k: p.grad.clone() for k, p in module.named_parameters()}


def conv_bn_net() -> nn.Module:
    """A small conv net with BatchNorm (training-mode batch statistics) and a linear head, float64."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).to(DT)


def task(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=DT)
    y = torch.arange(n) % 3
    return x, y


# ------------------------------------------------------------------ utils


def test_parameter_dict_takes_non_leaf_tensors_in_this_torch():
    """What clone_module and update_module rely on: the parameter dict accepts any tensor, and forward,
    parameters() and named_parameters() read it (setattr alone insists on nn.Parameter)."""
    lin = nn.Linear(3, 2)
    w = lin.weight * 2
    lin._parameters["weight"] = w
    assert lin.weight is w and any(p is w for p in lin.parameters())
    assert dict(lin.named_parameters())["weight"] is w
    x = torch.randn(4, 3)
    torch.testing.assert_close(lin(x), x @ w.t() + lin.bias)
    with pytest.raises(TypeError):
        lin.weight = w * 2


def test_clone_module_outputs_and_gradients_flow_to_the_original():
    net = conv_bn_net()
    x, y = task()
    clone = l2l.clone_module(net)
    assert clone is not net and type(clone) is type(net)
    for (k, p), (kc, c) in zip(net.named_parameters(), clone.named_parameters()):
        assert k == kc and c is not p and not c.is_leaf and torch.equal(c, p)
    torch.testing.assert_close(clone(x), net(x), rtol=0, atol=0)
    F.cross_entropy(clone(x), y).backward()
    via_clone = grads_of(net)
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    close(via_clone, grads_of(net), rtol=1e-12)
    # Updating the clone leaves the original as it was.
    before = {k: p.detach().clone() for k, p in net.named_parameters()}
    l2l.update_module(clone, updates=[torch.ones_like(p) for p in clone.parameters()])
    for k, p in net.named_parameters():
        assert torch.equal(p, before[k]) and isinstance(p, nn.Parameter)


def test_clone_module_batchnorm_buffers():
    """Running statistics are shared with the original, as learn2learn: what a clone gathers in training mode
    is there when the original is evaluated. A buffer that requires grad is cloned differentiably."""
    net = conv_bn_net()
    x, _ = task()
    bn = net[1]
    clone = l2l.clone_module(net)
    assert clone[1].running_mean is bn.running_mean and clone[1].num_batches_tracked is bn.num_batches_tracked
    mean_before = bn.running_mean.clone()
    clone(x)  # training mode: updates the (shared) running statistics
    assert not torch.equal(bn.running_mean, mean_before) and bn.num_batches_tracked.item() == 1
    net.eval()
    clone.eval()  # eval() on the clone sets its own flags only
    assert not net[0].training
    torch.testing.assert_close(l2l.clone_module(net)(x), net(x), rtol=0, atol=0)

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("shift", torch.ones(3, dtype=DT, requires_grad=True))

        def forward(self, x):
            return x + self.shift

    m = Shifted()
    c = l2l.clone_module(m)
    assert c.shift is not m.shift and not c.shift.is_leaf
    (c(torch.zeros(3, dtype=DT)) * torch.arange(3, dtype=DT)).sum().backward()
    torch.testing.assert_close(m.shift.grad, torch.arange(3, dtype=DT))


def test_clone_and_update_keep_shared_parameters_shared():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(4, 4, bias=False)
            self.dec = nn.Linear(4, 4, bias=False)
            self.dec.weight = self.enc.weight  # tied
            self.inner = nn.Sequential(nn.Tanh(), self.enc)  # the same submodule twice

        def forward(self, x):
            return self.dec(self.inner(self.enc(x)))

    torch.manual_seed(0)
    m = Tied().to(DT)
    x = torch.randn(5, 4, dtype=DT)
    c = l2l.clone_module(m)
    assert c.dec.weight is c.enc.weight and c.inner[1] is not None and c.inner[1].weight is c.enc.weight
    assert len(list(c.parameters())) == 1
    c(x).pow(2).sum().backward()
    via_clone = m.enc.weight.grad.clone()
    m.zero_grad()
    m(x).pow(2).sum().backward()
    torch.testing.assert_close(via_clone, m.enc.weight.grad)
    (u,) = [torch.full_like(p, 0.5) for p in c.parameters()]
    old = c.enc.weight
    l2l.update_module(c, updates=[u])
    assert c.dec.weight is c.enc.weight and c.inner[1].weight is c.enc.weight
    torch.testing.assert_close(c.enc.weight, old + 0.5)


def test_update_module_attribute_protocol_and_lengths():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)).to(DT)
    c = l2l.clone_module(m)
    params = list(c.parameters())
    for p in params[:2]:
        p.update = -0.1 * torch.ones_like(p)
    l2l.update_module(c)
    torch.testing.assert_close(c[0].weight, m[0].weight - 0.1)
    torch.testing.assert_close(c[0].bias, m[0].bias - 0.1)
    assert c[1].weight is params[2]  # no update attribute: unchanged
    with pytest.raises(ValueError, match="updates for"):
        l2l.update_module(c, updates=[None])


def test_clone_and_update_an_rnn():
    torch.manual_seed(0)
    rnn = nn.GRU(3, 4, batch_first=True).to(DT)
    x = torch.randn(2, 5, 3, dtype=DT)
    c = l2l.clone_module(rnn)
    torch.testing.assert_close(c(x)[0], rnn(x)[0], rtol=0, atol=0)
    updates = [0.01 * torch.randn_like(p) for p in c.parameters()]
    l2l.update_module(c, updates=updates)
    new = {k: p + u for (k, p), u in zip(rnn.named_parameters(), updates)}
    out = c(x)[0]
    torch.testing.assert_close(out, functional_call(rnn, new, (x,))[0])
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rnn.parameters())


def test_clone_and_adapt_a_parametrized_module():
    """torch.nn.utils.parametrize (here weight_norm): the parametrization's own tensors are what is cloned
    and adapted, and the weight computed from them follows."""
    torch.manual_seed(0)
    m = nn.utils.parametrizations.weight_norm(nn.Linear(3, 2)).to(DT)
    x = torch.randn(4, 3, dtype=DT)
    learner = l2l.algorithms.MAML(m, lr=0.1).clone()
    torch.testing.assert_close(learner(x), m(x), rtol=0, atol=0)
    learner.adapt(learner(x).pow(2).sum())
    new = {k: p - 0.1 * g for (k, p), g in zip(m.named_parameters(),
                                                torch.autograd.grad(m(x).pow(2).sum(), list(m.parameters())))}
    torch.testing.assert_close(learner(x), functional_call(m, new, (x,)))
    learner(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_detach_module_and_small_utils():
    torch.manual_seed(0)
    m = nn.Linear(3, 2).to(DT)
    c = l2l.clone_module(m)
    w = c.weight
    l2l.detach_module(c)
    assert c.weight is w and w.is_leaf and not w.requires_grad
    c2 = l2l.clone_module(m)
    l2l.detach_module(c2, keep_requires_grad=True)
    assert c2.weight.is_leaf and c2.weight.requires_grad
    c2(torch.ones(1, 3, dtype=DT)).sum().backward()
    assert m.weight.grad is None and c2.weight.grad is not None

    ps = [torch.randn(2, requires_grad=True) for _ in range(2)]
    cl = l2l.clone_parameters(ps)
    assert all(c is not p and torch.equal(c, p) and not c.is_leaf for c, p in zip(cl, ps))

    x = torch.tensor([0.3, -1.2], requires_grad=True)
    box = l2l.magic_box(x)
    torch.testing.assert_close(box, torch.ones(2))
    (box * torch.tensor([2.0, 3.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([2.0, 3.0]))
    assert l2l.magic_box(5) == 5


# ------------------------------------------------------------------ MAML against a functional reference


def reference_maml(net: nn.Module, tasks, lr: float, steps: int, first_order: bool) -> dict:
    """Per task: ``steps`` SGD steps with functional_call + autograd.grad, then the query loss's backward."""
    params = dict(net.named_parameters())
    for sx, sy, qx, qy in tasks:
        fast = params
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(net, fast, (sx,)), sy)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: w - lr * g for (k, w), g in zip(fast.items(), grads)}
        (F.cross_entropy(functional_call(net, fast, (qx,)), qy) / len(tasks)).backward()
    return grads_of(net)


def wrapper_maml(maml, tasks, steps: int) -> dict:
    for sx, sy, qx, qy in tasks:
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(sx), sy))
        (F.cross_entropy(learner(qx), qy) / len(tasks)).backward()
    return grads_of(maml.module)


def some_tasks(n: int = 2):
    return [(*task(6, seed=10 * i + 1), *task(9, seed=10 * i + 2)) for i in range(n)]


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient_equals_functional_reference(steps, first_order):
    net = conv_bn_net()
    tasks = some_tasks()
    want = reference_maml(copy.deepcopy(net), tasks, lr=0.3, steps=steps, first_order=first_order)
    maml = l2l.algorithms.MAML(copy.deepcopy(net), lr=0.3, first_order=first_order)
    close(wrapper_maml(maml, tasks, steps), want)
    if not first_order:  # the second-order terms are really there
        fo = reference_maml(copy.deepcopy(net), tasks, lr=0.3, steps=steps, first_order=True)
        assert max((fo[k] - want[k]).abs().max().item() for k in want) > 1e-6


def test_maml_clone_and_adapt_overrides():
    net = conv_bn_net()
    tasks = some_tasks(1)
    maml = l2l.algorithms.MAML(copy.deepcopy(net), lr=0.3)  # second order by default...
    (sx, sy, qx, qy), = tasks
    learner = maml.clone(first_order=True)  # ...first order for this clone
    assert learner.first_order and not maml.first_order
    learner.adapt(F.cross_entropy(learner(sx), sy))
    F.cross_entropy(learner(qx), qy).backward()
    close(grads_of(maml.module), reference_maml(copy.deepcopy(net), tasks, 0.3, 1, first_order=True))
    maml.zero_grad()
    learner = maml.clone()
    learner.adapt(F.cross_entropy(learner(sx), sy), first_order=True)  # per call
    F.cross_entropy(learner(qx), qy).backward()
    close(grads_of(maml.module), reference_maml(copy.deepcopy(net), tasks, 0.3, 1, first_order=True))


def test_maml_allow_nograd_and_allow_unused():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)
            self.spare = nn.Linear(4, 2)  # never used by forward

        def forward(self, x):
            return self.head(torch.tanh(self.body(x)))

    net = Net().to(DT)
    x, y = torch.randn(6, 4, dtype=DT), torch.arange(6) % 2
    # A frozen parameter: adapt refuses it unless allow_nograd.
    net.body.weight.requires_grad_(False)
    maml = l2l.algorithms.MAML(net, lr=0.1)
    assert maml.allow_unused is False
    learner = maml.clone()
    with pytest.raises(RuntimeError, match="allow_nograd=True"):
        learner.adapt(F.cross_entropy(learner(x), y))
    maml = l2l.algorithms.MAML(net, lr=0.1, allow_nograd=True)
    assert maml.allow_unused is True  # defaults to allow_nograd
    learner = maml.clone()
    learner.adapt(F.cross_entropy(learner(x), y))
    assert torch.equal(learner.body.weight, net.body.weight)  # frozen: not adapted
    assert torch.equal(learner.spare.weight, net.spare.weight)  # unused: not adapted
    assert not torch.equal(learner.head.weight, net.head.weight)
    F.cross_entropy(learner(x), y).backward()
    assert net.body.weight.grad is None and net.head.weight.grad is not None and net.body.bias.grad is not None
    # Unused parameters alone: allow_unused is enough.
    net.body.weight.requires_grad_(True)
    learner = l2l.algorithms.MAML(net, lr=0.1).clone()
    with pytest.raises(RuntimeError, match="allow_unused=True"):
        learner.adapt(F.cross_entropy(learner(x), y))
    learner = l2l.algorithms.MAML(net, lr=0.1, allow_unused=True).clone()
    learner.adapt(F.cross_entropy(learner(x), y))
    assert torch.equal(learner.spare.weight, net.spare.weight)


def test_maml_passes_forward_and_attributes_through():
    model = l2l.vision.models.OmniglotFC(28 * 28, 5, sizes=[8, 8])
    maml = l2l.algorithms.MAML(model, lr=0.1)
    assert maml.features is model.features and maml.classifier is model.classifier
    assert maml.input_size == 784 and maml.lr == 0.1
    learner = maml.clone()
    assert learner.classifier is not model.classifier and isinstance(learner.classifier, nn.Linear)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(learner(x), model(x))
    with pytest.raises(AttributeError):
        maml.no_such_attribute


# ------------------------------------------------------------------ MetaSGD and GBML


def linear_tasks(n: int = 2):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        out.append((torch.randn(6, 5, generator=g, dtype=DT), torch.arange(6) % 3,
                    torch.randn(9, 5, generator=g, dtype=DT), torch.arange(9) % 3))
    return out


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def test_metasgd_equals_per_parameter_rate_reference():
    net, tasks = mlp(), linear_tasks()
    torch.manual_seed(1)
    rates = {k: (0.05 + 0.1 * torch.rand_like(p)).requires_grad_() for k, p in net.named_parameters()}
    # Reference: functional, second order, one step with rate tensors.
    ref = copy.deepcopy(net)
    ref_rates = {k: r.detach().clone().requires_grad_() for k, r in rates.items()}
    params = dict(ref.named_parameters())
    for sx, sy, qx, qy in tasks:
        g = torch.autograd.grad(F.cross_entropy(functional_call(ref, params, (sx,)), sy), list(params.values()),
                                create_graph=True)
        fast = {k: w - ref_rates[k] * gk for (k, w), gk in zip(params.items(), g)}
        (F.cross_entropy(functional_call(ref, fast, (qx,)), qy) / len(tasks)).backward()

    meta = l2l.algorithms.MetaSGD(copy.deepcopy(net), lr=0.1)
    assert len(meta.lrs) == 4 and all(torch.all(r == 0.1) for r in meta.lrs)
    assert {id(p) for p in meta.parameters()} >= {id(r) for r in meta.lrs}  # the rates are meta-parameters
    with torch.no_grad():
        for r, k in zip(meta.lrs, rates):
            r.copy_(rates[k])
    for sx, sy, qx, qy in tasks:
        learner = meta.clone()
        learner.adapt(F.cross_entropy(learner(sx), sy))
        (F.cross_entropy(learner(qx), qy) / len(tasks)).backward()
    close(grads_of(meta.module), grads_of(ref))
    close({k: r.grad for k, r in zip(rates, meta.lrs)}, {k: r.grad for k, r in ref_rates.items()})


@pytest.mark.parametrize("first_order", [False, True])
def test_gbml_with_a_scale_transform_is_metasgd(first_order):
    net, tasks = mlp(), linear_tasks()
    meta = l2l.algorithms.MetaSGD(copy.deepcopy(net), lr=0.25, first_order=first_order)
    gbml = l2l.algorithms.GBML(copy.deepcopy(net), transform=lambda p: l2l.nn.Scale(p.shape, alpha=0.25), lr=1.0,
                               first_order=first_order).to(DT)  # the scales are made in the default dtype
    scales = [t.alpha for t in gbml.compute_update.transforms_modules]
    assert len(scales) == 4 and {id(s) for s in scales} <= {id(p) for p in gbml.parameters()}
    for wrapper in (meta, gbml):
        for sx, sy, qx, qy in tasks:
            learner = wrapper.clone()
            for _ in range(2):
                learner.adapt(F.cross_entropy(learner(sx), sy))
            (F.cross_entropy(learner(qx), qy) / len(tasks)).backward()
    close(grads_of(gbml.module), grads_of(meta.module))
    close({i: s.grad for i, s in enumerate(scales)}, {i: r.grad for i, r in enumerate(meta.lrs)})


def test_gbml_adapt_transform_matches_reference():
    """adapt_transform: before each step after the first, the scales take an SGD step (rate lr) on the current
    loss; written out by hand for two steps."""
    net, ((sx, sy, qx, qy),) = mlp(), linear_tasks(1)
    lr, a0 = 0.5, 0.25  # exact in float32, the dtype the scales are made in
    ref = copy.deepcopy(net)
    alphas = {k: torch.full_like(p, a0).requires_grad_() for k, p in ref.named_parameters()}
    theta = dict(ref.named_parameters())

    def loss_at(p):
        return F.cross_entropy(functional_call(ref, p, (sx,)), sy)

    g0 = torch.autograd.grad(loss_at(theta), list(theta.values()), create_graph=True)
    p1 = {k: w - lr * alphas[k] * g for (k, w), g in zip(theta.items(), g0)}
    l1 = loss_at(p1)
    ga = torch.autograd.grad(l1, list(alphas.values()), create_graph=True, retain_graph=True)
    a1 = {k: a - lr * g for (k, a), g in zip(alphas.items(), ga)}
    g1 = torch.autograd.grad(l1, list(p1.values()), create_graph=True)
    p2 = {k: w - lr * a1[k] * g for (k, w), g in zip(p1.items(), g1)}
    F.cross_entropy(functional_call(ref, p2, (qx,)), qy).backward()

    gbml = l2l.algorithms.GBML(copy.deepcopy(net), lambda p: l2l.nn.Scale(p.shape, alpha=a0), lr=lr,
                               adapt_transform=True).to(DT)
    learner = gbml.clone()
    for _ in range(2):
        learner.adapt(F.cross_entropy(learner(sx), sy))
    F.cross_entropy(learner(qx), qy).backward()
    close(grads_of(gbml.module), grads_of(ref))
    scales = [t.alpha for t in gbml.compute_update.transforms_modules]
    close({i: s.grad for i, s in enumerate(scales)}, {i: a.grad for i, a in enumerate(alphas.values())})


def test_gbml_transform_may_skip_parameters_and_must_return_modules():
    net, ((sx, sy, _, _),) = mlp(), linear_tasks(1)
    # None for biases: their update is the plain gradient (times lr).
    gbml = l2l.algorithms.GBML(copy.deepcopy(net), lambda p: l2l.nn.Scale(p.shape, 0.5) if p.dim() > 1 else None,
                               lr=0.2).to(DT)
    learner = gbml.clone()
    learner.adapt(F.cross_entropy(learner(sx), sy))
    grads = torch.autograd.grad(F.cross_entropy(net(sx), sy), list(net.parameters()))
    for (k, p), g, new in zip(net.named_parameters(), grads, learner.module.parameters()):
        step = 0.2 * (0.5 if p.dim() > 1 else 1.0)
        torch.testing.assert_close(new, p - step * g)
    with pytest.raises(ValueError, match="nn.Module or None"):
        l2l.algorithms.GBML(net, lambda p: 0.5)


def test_lightning_wrappers_name_the_metalearn_command():
    with pytest.raises(Unsupported, match="metalearn train algo=maml"):
        l2l.algorithms.LightningMAML(nn.Linear(2, 2))
    with pytest.raises(NotImplementedError, match="algo=protonet"):
        l2l.algorithms.LightningPrototypicalNetworks(nn.Linear(2, 2))
    with pytest.raises(NotImplementedError, match="algo=metaoptnet_svm"):
        l2l.nn.SVClassifier()


# ------------------------------------------------------------------ against metalearn's own MAML


def test_maml_wrapper_meta_gradient_equals_metalearn_maml():
    """Same weights, same TaskBatch, one second-order inner step of the same rate: metalearn's MAML
    (functional_call over a parameter dict) and the learn2learn wrapper (cloned modules) agree in float64."""
    from metalearn.config import to_run_config
    from metalearn.data import TaskBatch
    from metalearn.engine import build_algorithm, load_data

    ways, shots, queries, tasks, inner_lr = 3, 2, 3, 3, 0.4
    cfg = to_run_config({
        "algo": {"name": "maml", "first_order": False, "inner_lr": inner_lr, "inner_steps": 1, "batched": "loop"},
        "data": {"name": "glyphs", "split_sizes": [12, 6, 6]}, "backbone": {"name": "conv4", "hidden": 8},
        "device": {"type": "cpu"}, "ways": ways, "shots": shots, "queries": queries, "meta_batch_size": tasks,
        "eval": {"ways": ways, "shots": shots, "queries": queries, "batch_size": tasks}})
    stores = load_data(cfg, torch.device("cpu"))
    batch = stores["train"].sampler(ways, shots, queries, tasks, seed=0, training=True).sample()
    batch = TaskBatch(batch.support_x.to(DT), batch.support_y, batch.query_x.to(DT), batch.query_y, batch.classes)
    torch.manual_seed(0)
    algo = build_algorithm(cfg, stores["train"]).to(DT)
    # conv4's BatchNorm uses each set's batch statistics and has no buffers: the net itself can be wrapped.
    maml = l2l.algorithms.MAML(copy.deepcopy(algo.net), lr=inner_lr)

    algo.zero_grad(set_to_none=True)
    algo.meta_step(batch)
    want = grads_of(algo.net)
    for t in range(tasks):
        learner = maml.clone()
        learner.adapt(F.cross_entropy(learner(batch.support_x[t]), batch.support_y[t]))
        (F.cross_entropy(learner(batch.query_x[t]), batch.query_y[t]) / tasks).backward()
    close(grads_of(maml.module), want)


# ------------------------------------------------------------------ nn


def test_prototypical_classifier():
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [10.0, 10.0], [0.0, 2.0]], requires_grad=True)
    labels = torch.tensor([7, 7, 3, 9, 3])  # uneven shots, unsorted, non-contiguous labels
    clf = l2l.nn.PrototypicalClassifier(support, labels)
    # Prototypes in label order: 3 -> (0, 3), 7 -> (1, 0), 9 -> (10, 10)
    torch.testing.assert_close(clf.prototypes, torch.tensor([[0.0, 3.0], [1.0, 0.0], [10.0, 10.0]]))
    q = torch.tensor([[1.0, 1.0], [9.0, 9.0]])
    want = -torch.tensor([[1.0 + 4, 0 + 1, 81 + 81], [81 + 36, 64 + 81, 1 + 1]])
    torch.testing.assert_close(clf(q), want)
    F.cross_entropy(clf(q), torch.tensor([1, 2])).backward()
    assert support.grad is not None and support.grad.abs().sum() > 0

    cos = l2l.nn.PrototypicalClassifier(distance="cosine")
    assert cos.normalize
    with pytest.raises(RuntimeError, match="fit_"):
        cos(q)
    protos = cos.fit_(torch.tensor([[3.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 1]))
    torch.testing.assert_close(protos, torch.eye(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(cos(torch.tensor([[1.0, 1.0]])), torch.tensor([[0.5 ** 0.5, 0.5 ** 0.5]]))
    l1 = l2l.nn.PrototypicalClassifier(distance=lambda p, x: torch.cdist(x, p, p=1))
    l1.fit_(torch.tensor([[0.0, 0.0], [4.0, 4.0]]).view(2, 1, 2), torch.tensor([0, 1]))  # [n, 1, 2]: flattened
    torch.testing.assert_close(l1(torch.tensor([[1.0, 2.0]])), -torch.tensor([[3.0, 5.0]]))


def test_small_modules():
    x = torch.randn(4, 3, 5, 5)
    assert l2l.nn.Flatten()(x).shape == (4, 75)
    torch.testing.assert_close(l2l.nn.Lambda(lambda t: t.mean(dim=[2, 3]))(x), x.mean(dim=[2, 3]))
    s = l2l.nn.Scale(alpha=0.5)
    assert s.alpha.shape == (1,) and isinstance(s.alpha, nn.Parameter)
    torch.testing.assert_close(s(torch.ones(3)), torch.full((3,), 0.5))
    assert l2l.nn.Scale(3, alpha=2.0).alpha.shape == (3,) and l2l.nn.Scale((2, 3)).alpha.shape == (2, 3)
    (s(torch.ones(3)).sum()).backward()
    torch.testing.assert_close(s.alpha.grad, torch.tensor([3.0]))


# ------------------------------------------------------------------ vision.models


def test_vision_model_shapes():
    M = l2l.vision.models
    x28 = torch.randn(4, 1, 28, 28)
    fc = M.OmniglotFC(28 * 28, 5)
    assert fc(x28).shape == (4, 5) and fc.features(x28).shape == (4, 64)
    assert M.OmniglotFC(28 * 28, 5, sizes=[16, 8]).features(x28).shape == (4, 8)
    cnn = M.OmniglotCNN(5, hidden_size=16)
    assert cnn(x28).shape == (4, 5) and cnn(x28.view(4, 784)).shape == (4, 5) and cnn.features(x28).shape == (4, 16)
    assert len(cnn.base) == 4 and isinstance(cnn.base[0].conv, nn.Conv2d) and cnn.base[0].conv.stride == (2, 2)

    x84 = torch.randn(2, 3, 84, 84)
    cnn4 = M.CNN4(5, hidden_size=8)
    assert cnn4(x84).shape == (2, 5) and cnn4.features(x84).shape == (2, 25 * 8)
    block = cnn4.features[0]
    assert isinstance(block.normalize, nn.BatchNorm2d) and isinstance(block.max_pool, nn.MaxPool2d)
    assert M.CNN4(5, hidden_size=8, layers=2).features(x84).shape == (2, 25 * 8)  # pools by 4
    assert M.CNN4(5, hidden_size=8, embedding_size=32)(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    mini = M.MiniImagenetCNN(5)
    assert mini.hidden_size == 32 and mini(x84).shape == (2, 5) and mini.classifier.in_features == 800

    # ResNet-12 is big: one image at 84x84, in eval mode (running statistics), and few instances.
    one84 = x84[:1]
    res = M.ResNet12(5).eval()
    assert res.features(one84).shape == (1, 640) and res(one84).shape == (1, 5)
    assert [b.conv1.out_channels for b in (res.features.layer1, res.features.layer2, res.features.layer3,
                                           res.features.layer4)] == [64, 160, 320, 640]
    flat = M.ResNet12(5, hidden_size=16000, avg_pool=False).eval()
    assert flat.features(one84).shape == (1, 16000) and flat(one84).shape == (1, 5)
    # Not wider: 512 features; with avg_pool any input size works (32x32: 2x2 maps), in training mode too.
    small = M.ResNet12(5, hidden_size=512, wider=False, channels=1)
    assert small.features(torch.randn(2, 1, 32, 32)).shape == (2, 512)


def test_dropblock_drops_blocks_and_keeps_the_expected_scale():
    torch.manual_seed(0)
    drop = l2l.vision.models.DropBlock(block_size=3).train()
    x = torch.ones(8, 4, 10, 10)
    out = drop(x, gamma=0.05)
    zero = out == 0
    assert 0 < zero.float().mean() < 0.9
    kept = out[~zero]
    torch.testing.assert_close(kept, torch.full_like(kept, x.numel() / (~zero).sum().item()))
    assert torch.equal(drop.eval()(x, gamma=0.5), x)


# ------------------------------------------------------------------ a tiny training loop


def test_maml_wrapper_meta_learns_on_synthetic_tasks():
    """5-way 1-shot tasks whose classes differ only in 4 of 20 input dimensions (the rest is noise, fresh per
    task): MAML with the wrapper learns an initialisation that adapts in one step far better than at the start,
    and far above chance."""
    ways, dim, signal = 5, 20, 4
    gen = torch.Generator().manual_seed(0)

    def sample_task(shots):
        means = torch.zeros(ways, dim)
        means[:, :signal] = 3 * torch.randn(ways, signal, generator=gen)
        noise_scale = torch.ones(dim)
        noise_scale[signal:] = 3.0  # large noise in the uninformative dimensions
        y = torch.arange(ways).repeat(shots)
        return means[y] + noise_scale * torch.randn(len(y), dim, generator=gen), y

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, ways))
    maml = l2l.algorithms.MAML(model, lr=0.5)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-2)

    def adapted_accuracy(episodes=40):
        correct = total = 0
        for _ in range(episodes):
            x, y = sample_task(6)  # one task: the first `ways` examples (one per class) are its support set
            sx, sy, qx, qy = x[:ways], y[:ways], x[ways:], y[ways:]
            learner = maml.clone()
            learner.adapt(F.cross_entropy(learner(sx), sy))
            with torch.no_grad():
                correct += (learner(qx).argmax(1) == qy).sum().item()
                total += len(qy)
        return correct / total

    before = adapted_accuracy()
    for _ in range(60):
        opt.zero_grad()
        for _ in range(4):
            x, y = sample_task(6)
            learner = maml.clone()
            learner.adapt(F.cross_entropy(learner(x[:ways]), y[:ways]))
            (F.cross_entropy(learner(x[ways:]), y[ways:]) / 4).backward()
        opt.step()
    after = adapted_accuracy()
    # About 0.33 before and 0.62-0.66 after over seeds 0-2 (chance: 0.2).
    assert after > 0.5 and after > before + 0.15, (before, after)
