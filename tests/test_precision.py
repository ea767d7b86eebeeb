"""``device.precision=bf16``: meta-steps and evaluation under bfloat16 autocast, the same engine loop.

bfloat16 keeps 8 bits of mantissa, so its meta-gradients are near the float32 ones, not equal: the
tests check they point the same way and are close in size, that autocast really ran (they differ
from float32), that a run trains and evaluates end to end, and that an unknown value is one line.
"""

from __future__ import annotations

import json

import pytest
import torch

from metalearn.algorithms import ProblemInfo
from metalearn.algorithms import maml as maml_mod
from metalearn.algorithms import protonet as protonet_mod
from metalearn.data import TaskBatch
from metalearn.engine import autocast
from metalearn.errors import ConfigError
from metalearn.models import conv4

WAYS, SHOTS, QUERIES, TASKS, SIZE = 5, 1, 5, 3, 28


def batch() -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS).repeat(TASKS, 1)
    qy = torch.arange(WAYS).repeat_interleave(QUERIES).repeat(TASKS, 1)
    sx = torch.randn(TASKS, sy.shape[1], 1, SIZE, SIZE, generator=g)
    qx = torch.randn(TASKS, qy.shape[1], 1, SIZE, SIZE, generator=g)
    return TaskBatch(sx, sy, qx, qy, torch.arange(WAYS).repeat(TASKS, 1))


def algorithm(name: str):
    torch.manual_seed(0)
    backbone = conv4.build(conv4.Config(hidden=16), (1, SIZE, SIZE))
    info = ProblemInfo(input_shape=(1, SIZE, SIZE), ways=WAYS, num_train_classes=10)
    if name == "maml":
        return maml_mod.build(maml_mod.Config(inner_lr=0.4, inner_steps=1), backbone, info)
    return protonet_mod.build(protonet_mod.Config(), backbone, info)


def meta_gradient(algo, precision: str) -> torch.Tensor:
    algo.zero_grad(set_to_none=True)
    with autocast(torch.device("cpu"), precision):
        metrics = algo.meta_step(batch())
    assert all(torch.isfinite(v).all() for v in metrics.values())
    return torch.cat([p.grad.flatten() for p in algo.parameters()])


@pytest.mark.parametrize("name", ["maml", "protonet"])
def test_bf16_meta_gradient_is_near_float32(name):
    algo = algorithm(name)
    full, half = meta_gradient(algo, "fp32"), meta_gradient(algo, "bf16")
    assert full.dtype == half.dtype == torch.float32  # the meta-parameters' gradients stay float32
    assert not torch.equal(full, half)  # autocast really ran in bfloat16
    # bf16 keeps about 3 significant digits through 4 BatchNorm blocks: cosine 0.88 for second-order
    # MAML here (0.7-0.99 per tensor), 0.99+ for protonet. Near, not equal; learning is tested below.
    cosine = torch.nn.functional.cosine_similarity(full, half, dim=0)
    assert cosine > {"maml": 0.8, "protonet": 0.95}[name], cosine
    assert abs(half.norm() / full.norm() - 1) < 0.25


def test_protonet_learns_in_bf16(learning):
    """The default tier's bf16 learning check (second-order MAML's is the slow tier's, below): conv4-16,
    4 updates, 40 test episodes. Calibrated over seeds 0-4 (2-core shared CPU, about 10 s each):
    0.40-0.48 -> 0.60-0.66 (gain 0.17-0.22); chance is 0.2."""
    cfg = learning.config("protonet", steps=4, precision="bf16", backbone={"name": "conv4", "hidden": 16})
    before, after, seconds = learning.run(cfg, episodes=40)
    print(f"protonet bf16 5-way 1-shot glyphs: {before:.3f} -> {after:.3f} in {seconds:.1f}s")
    assert after >= 0.5 and after >= before + 0.1


@pytest.mark.slow  # the suite's most expensive test (bf16 second-order MAML on CPU); reduced form above
def test_second_order_maml_learns_in_bf16(learning):
    # The thresholds of test_algorithms.py's test_maml_learns (float32: 0.45-0.50 -> 0.70-0.74 over seeds 0-5).
    from test_algorithms import MAML_GAIN, MAML_LR, MAML_MIN, MAML_STEPS

    cfg = learning.config({"name": "maml", "inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 3}, steps=MAML_STEPS,
                          lr=MAML_LR, precision="bf16")
    before, after, seconds = learning.run(cfg)
    print(f"maml bf16 5-way 1-shot glyphs: {before:.3f} -> {after:.3f} in {seconds:.1f}s")
    assert after >= MAML_MIN and after >= before + MAML_GAIN


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="device.precision='fp16' is not one of: fp32, bf16, auto"):
        autocast(torch.device("cpu"), "fp16")


def test_bf16_run_trains_and_evaluates_through_the_cli(cli, tmp_path):
    # bf16 matmuls are emulated on most CPUs (several times fp32's time): one validation, few episodes.
    fast = cli.with_overrides(cli.FAST, "trainer.val_every=20", "trainer.val_episodes=5", "trainer.test_episodes=10")
    proc = cli.run(["train", *fast, "algo=protonet", "device=cpu", "device.precision=bf16"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    results = json.loads(next(tmp_path.glob("outputs/*/*/results.json")).read_text())
    assert 0.2 < results["test"]["accuracy"]["mean"] <= 1
    (tmp_path / "bad").mkdir()
    bad = cli.run(["train", *cli.FAST, "device=cpu", "device.precision=fp16"], tmp_path / "bad")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == ("metalearn: error: device.precision='fp16' is not one of: fp32, bf16, auto")


def test_auto_precision_is_fp32_on_cpu_and_bf16_warns_without_native_support(monkeypatch, caplog):
    import logging

    from metalearn import engine

    with engine.autocast(torch.device("cpu"), "auto"):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(engine, "native_bf16_cpu", lambda: False)
    monkeypatch.setattr(engine, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="metalearn"):
        with engine.autocast(torch.device("cpu"), "bf16"):
            assert torch.is_autocast_enabled("cpu")
        engine.autocast(torch.device("cpu"), "bf16")  # once per process
    assert [r.message for r in caplog.records].count(
        "device.precision=bf16 on a CPU without native bfloat16 (no AVX512-BF16 or AMX): it is emulated, many times "
        "slower than fp32; device.precision=fp32 (or auto) is faster here") == 1
