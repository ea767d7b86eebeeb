"""MAML and Meta-SGD with the tasks folded into one batch (``algo.batched``) against the per-task loop.

Every batched mode must give the per-task loop's meta-gradient, metrics and
evaluation: float64 to ~1e-10, float32 to ~1e-5 relative, for first and
second order, with and without BatchNorm, one and two inner steps, Meta-SGD's
learned rates, uneven task chunks, and the regression MLP. The batched forward
of ``models.functional`` is checked against the modules themselves.
Timings are scripts/bench_meta_step.py's business, not these tests'.
"""

from __future__ import annotations

import pytest
import torch

from metalearn.algorithms import ProblemInfo
from metalearn.algorithms import maml as maml_mod
from metalearn.algorithms import metasgd as metasgd_mod
from metalearn.data import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models import conv4, mlp, resnet12
from metalearn.models.functional import task_batched_forward

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 3, 3
SIZE, HIDDEN, LAYERS = 8, 4, 3
BATCHED_MODES = [m for m in maml_mod.BATCHED if m not in ("loop", "auto")]


def build(module, dtype=torch.float64, norm="batch", seed=0, **cfg):
    torch.manual_seed(seed)
    backbone = conv4.build(conv4.Config(hidden=HIDDEN, layers=LAYERS, norm=norm), (1, SIZE, SIZE))
    info = ProblemInfo(input_shape=(1, SIZE, SIZE), ways=WAYS, num_train_classes=10)
    algo = module.build(module.Config(**cfg), backbone, info).to(dtype)
    with torch.no_grad():  # non-trivial BatchNorm affine parameters and (Meta-SGD) rates that differ per entry
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in algo.named_parameters():
            if "norms" in name or "inner_lrs" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return algo


def random_batch(seed=1, tasks=TASKS, dtype=torch.float64) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def labels(k):
        y = torch.arange(WAYS).repeat_interleave(k)
        return torch.stack([y[torch.randperm(len(y), generator=g)] for _ in range(tasks)])

    sy, qy = labels(SHOTS), labels(QUERIES)
    sx = torch.randn(tasks, sy.shape[1], 1, SIZE, SIZE, generator=g, dtype=dtype)
    qx = torch.randn(tasks, qy.shape[1], 1, SIZE, SIZE, generator=g, dtype=dtype)
    return TaskBatch(sx, sy, qx, qy, torch.arange(WAYS).repeat(tasks, 1))


def meta_grad(algo, batch):
    algo.zero_grad(set_to_none=True)
    metrics = algo.meta_step(batch)
    return {k: p.grad.clone() for k, p in algo.named_parameters()}, metrics


def assert_same(got: dict, ref: dict, rtol: float):
    """Equal up to ``rtol`` of the largest entry of the reference: conv biases before BatchNorm have
    gradients that are zero up to rounding, so entry-wise relative errors would be meaningless."""
    assert list(got) == list(ref)
    scale = max(v.abs().max().item() for v in ref.values())
    for k in ref:
        err = (got[k] - ref[k]).abs().max().item()
        assert err <= rtol * scale, f"{k}: max abs difference {err:.3g} vs scale {scale:.3g}"


def pair(module, mode, dtype=torch.float64, **cfg):
    """The loop and a batched run of the same algorithm, from the same weights."""
    loop = build(module, dtype=dtype, batched="loop", **cfg)
    other = build(module, dtype=dtype, batched=mode, **cfg)
    other.load_state_dict(loop.state_dict())
    return loop, other


@pytest.mark.parametrize("mode", BATCHED_MODES)
@pytest.mark.parametrize("module", [maml_mod, metasgd_mod], ids=["maml", "metasgd"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("steps", [1, 2])
def test_batched_meta_gradient_equals_the_loop(mode, module, first_order, norm, steps):
    loop, batched = pair(module, mode, inner_lr=0.3, inner_steps=steps, first_order=first_order, norm=norm)
    assert not loop.folds(random_batch()) and batched.folds(random_batch())
    batch = random_batch()
    g_loop, m_loop = meta_grad(loop, batch)
    g_batched, m_batched = meta_grad(batched, batch)
    assert_same(g_batched, g_loop, rtol=1e-10)
    # Conv biases before BatchNorm (and Meta-SGD's rates for them) have gradients that are zero.
    names = [k for k, _ in loop.net.named_parameters()]
    bias_rates = {f"inner_lrs.{i}" for i, k in enumerate(names) if "convs" in k and "bias" in k}
    assert all(v.abs().sum() > 0 for k, v in g_loop.items() if ("convs" not in k or "weight" in k) and k not in bias_rates)
    assert m_batched.keys() == m_loop.keys() == {"loss", "accuracy"}
    torch.testing.assert_close(m_batched["loss"], m_loop["loss"], rtol=1e-12, atol=1e-12)
    assert torch.equal(m_batched["accuracy"], m_loop["accuracy"])


@pytest.mark.parametrize("mode", BATCHED_MODES)
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_task_chunks_do_not_change_the_result(mode, chunk):
    """Chunks of 1, 2 (uneven: 5 tasks = 2 + 2 + 1) and more than the batch."""
    loop, batched = pair(maml_mod, mode, inner_lr=0.3, inner_steps=2, task_chunk=chunk)
    batch = random_batch(tasks=5)
    g_loop, m_loop = meta_grad(loop, batch)
    g_batched, m_batched = meta_grad(batched, batch)
    assert_same(g_batched, g_loop, rtol=1e-10)
    torch.testing.assert_close(m_batched["loss"], m_loop["loss"], rtol=1e-12, atol=1e-12)
    e_loop, e_batched = loop.evaluate(batch), batched.evaluate(batch)
    torch.testing.assert_close(e_batched["loss"], e_loop["loss"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", BATCHED_MODES)
@pytest.mark.parametrize("module", [maml_mod, metasgd_mod], ids=["maml", "metasgd"])
def test_batched_float32_is_within_rounding_of_the_loop(mode, module):
    loop, batched = pair(module, mode, dtype=torch.float32, inner_lr=0.3, inner_steps=1)
    batch = random_batch(dtype=torch.float32)
    assert_same(meta_grad(batched, batch)[0], meta_grad(loop, batch)[0], rtol=1e-5)


@pytest.mark.parametrize("mode", BATCHED_MODES)
@pytest.mark.parametrize("module", [maml_mod, metasgd_mod], ids=["maml", "metasgd"])
def test_batched_evaluate_equals_the_loop(mode, module):
    loop, batched = pair(module, mode, inner_lr=0.3, test_inner_steps=3)
    batch = random_batch(seed=4)
    before = {k: v.clone() for k, v in batched.state_dict().items()}
    e_loop, e_batched = loop.evaluate(batch), batched.evaluate(batch)
    assert e_batched.keys() == e_loop.keys() == {"loss", "accuracy"}
    torch.testing.assert_close(e_batched["loss"], e_loop["loss"], rtol=1e-10, atol=1e-12)
    assert torch.equal(e_batched["accuracy"], e_loop["accuracy"])
    # evaluation leaves the meta-parameters and their gradients alone
    assert all(torch.equal(v, batched.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in batched.parameters())


REGRESSION = ProblemInfo(input_shape=(1,), ways=1, num_train_classes=0, task="regression", output_size=1)


def regression_pair(mode, **cfg):
    algos = []
    for batched in ("loop", mode):
        torch.manual_seed(0)
        algos.append(maml_mod.build(maml_mod.Config(batched=batched, **cfg), mlp.build(mlp.Config(hidden=[8, 8]), (1,)),
                                    REGRESSION).double())
    algos[1].load_state_dict(algos[0].state_dict())
    g = torch.Generator().manual_seed(2)
    x, qx = (torch.rand(4, k, 1, generator=g, dtype=torch.float64) * 10 - 5 for k in (5, 7))
    batch = TaskBatch(x, torch.sin(x), qx, torch.sin(qx), torch.zeros(4, 1, dtype=torch.long))
    return algos, batch


@pytest.mark.parametrize("mode", BATCHED_MODES)
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_batched_regression_equals_the_loop(mode, first_order):
    (loop, batched), batch = regression_pair(mode, inner_lr=0.05, inner_steps=2, first_order=first_order,
                                             test_inner_steps=3)
    g_loop, m_loop = meta_grad(loop, batch)
    g_batched, m_batched = meta_grad(batched, batch)
    assert_same(g_batched, g_loop, rtol=1e-10)
    assert m_batched.keys() == m_loop.keys() == {"mse"}
    torch.testing.assert_close(m_batched["mse"], m_loop["mse"], rtol=1e-12, atol=1e-14)
    e_loop, e_batched = loop.evaluate(batch), batched.evaluate(batch)
    assert e_batched.keys() == e_loop.keys() == {"mse", *(f"mse_step{k}" for k in range(4))}
    for k in e_loop:
        torch.testing.assert_close(e_batched[k], e_loop[k], rtol=1e-10, atol=1e-14, msg=k)


def test_auto_folds_vector_inputs_on_cpu():
    """The mlp's per-task loop is all overhead: auto folds it on CPU too, the whole meta-batch at once."""
    (loop, auto), batch = regression_pair("auto")
    assert auto.folds(batch) and not loop.folds(batch) and auto.task_chunk(batch) == batch.num_tasks
    assert_same(meta_grad(auto, batch)[0], meta_grad(loop, batch)[0], rtol=1e-10)


def test_zero_inner_steps_is_the_plain_gradient_batched():
    loop, batched = pair(maml_mod, "fold", inner_steps=0)
    batch = random_batch()
    assert_same(meta_grad(batched, batch)[0], meta_grad(loop, batch)[0], rtol=1e-10)


@pytest.mark.parametrize("norm,pools", [("batch", None), ("batch", 1), ("none", 2)])
def test_functional_forward_equals_the_modules(norm, pools):
    torch.manual_seed(0)
    backbone = conv4.build(conv4.Config(hidden=HIDDEN, layers=LAYERS, norm=norm, pool_layers=pools), (2, SIZE, SIZE))
    net = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.out_features, 3)).double()
    forward = task_batched_forward(net)
    x = torch.randn(4, 5, 2, SIZE, SIZE, dtype=torch.float64)
    # different weights per task: the module with task t's weights on task t's inputs
    stacked = {k: p.detach() + 0.1 * torch.randn(4, *p.shape, dtype=p.dtype) for k, p in net.named_parameters()}
    got = forward(stacked, x)
    want = torch.stack([torch.func.functional_call(net, {k: v[t] for k, v in stacked.items()}, (x[t],))
                        for t in range(4)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_auto_is_the_loop_on_cpu_and_fold_can_be_forced():
    """auto folds images on accelerators only: on CPU the folded conv4 step measured slower than the loop."""
    batch32, batch64 = random_batch(dtype=torch.float32), random_batch()
    auto = build(maml_mod, dtype=torch.float32)
    assert auto.cfg.batched == "auto" and auto._batched_forward is not None and not auto.folds(batch32)
    assert build(maml_mod, batched="fold").folds(batch64)
    assert auto.task_chunk(random_batch(tasks=20)) == 16 and auto.task_chunk(batch32) == TASKS
    torch.manual_seed(0)
    backbone = resnet12.build(resnet12.Config(channels=[4, 4, 4, 4]), (3, 16, 16))
    info = ProblemInfo(input_shape=(3, 16, 16), ways=WAYS, num_train_classes=10)
    assert maml_mod.build(maml_mod.Config(), backbone, info)._batched_forward is None  # auto: the loop
    with pytest.raises(ConfigError, match="batched=fold runs conv4 and mlp"):
        maml_mod.build(maml_mod.Config(batched="fold"), backbone, info)
    with pytest.raises(ConfigError, match="algo.batched='vmap' is not one of"):
        build(maml_mod, batched="vmap")
    with pytest.raises(ConfigError, match="task_chunk"):
        build(maml_mod, task_chunk=-1)


@pytest.mark.parametrize("mode", ["loop", "fold"])
@pytest.mark.parametrize("module", [maml_mod, metasgd_mod], ids=["maml", "metasgd"])
def test_checkpointed_inner_steps_give_the_same_meta_gradient(module, mode):
    """checkpoint_inner recomputes each inner step in the backward: exactly the same gradients."""
    plain = build(module, batched=mode, inner_steps=3)
    recomputed = build(module, batched=mode, inner_steps=3, checkpoint_inner=True)
    recomputed.load_state_dict(plain.state_dict())
    assert recomputed.recompute and not plain.recompute
    batch = random_batch()
    g_plain, m_plain = meta_grad(plain, batch)
    g_recomputed, m_recomputed = meta_grad(recomputed, batch)
    assert_same(g_recomputed, g_plain, rtol=1e-12)
    torch.testing.assert_close(m_recomputed["loss"], m_plain["loss"], rtol=0, atol=0)
