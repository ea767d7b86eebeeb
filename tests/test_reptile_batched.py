"""Reptile's folded path (algo.batched=fold: task_chunk tasks at once through the batched forward) against its
per-task loop: the same meta-gradient, metrics and scores up to float rounding (float64), the same random draws."""

from __future__ import annotations

import pytest
import torch

from metalearn.algorithms import ProblemInfo, reptile
from metalearn.data.episodes import TaskBatch
from metalearn.models import conv4, mlp
from plainops import random_batch


def vector_batch(seed: int, tasks: int, shots: int, queries: int) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    amp, phase = torch.rand(tasks, 1, 1, generator=g, dtype=torch.float64) * 4 + 1, torch.rand(tasks, 1, 1, generator=g, dtype=torch.float64)
    x = torch.rand(tasks, shots + queries, 1, generator=g, dtype=torch.float64) * 10 - 5
    y = amp * torch.sin(x - phase)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], torch.zeros(tasks, 1, dtype=torch.long))


def pair(build_backbone, info, **options):
    algos = []
    for batched in ("loop", "fold"):
        torch.manual_seed(0)
        cfg = reptile.Config(batched=batched, **options)
        algos.append(reptile.build(cfg, build_backbone(), info).double())
    algos[1].load_state_dict(algos[0].state_dict())
    return algos


@pytest.mark.parametrize("kind", ["vectors", "images"])
def test_fold_gives_the_loops_meta_gradient_metrics_and_scores(kind):
    if kind == "vectors":
        info = ProblemInfo(input_shape=(1,), ways=1, num_train_classes=0, task="regression", output_size=1)
        algos = pair(lambda: mlp.build(mlp.Config(hidden=[16, 16]), (1,)), info, inner_lr=0.01, inner_batch_size=7,
                     test_inner_steps=4, task_chunk=3)
        batch = vector_batch(1, tasks=5, shots=5, queries=6)
    else:
        info = ProblemInfo(input_shape=(1, 12, 12), ways=3, num_train_classes=10)
        algos = pair(lambda: conv4.build(conv4.Config(hidden=8, layers=2), (1, 12, 12)), info, inner_lr=0.1,
                     inner_batch_size=4, test_inner_steps=3, task_chunk=2)
        batch = random_batch(2, tasks=3, ways=3, shots=2, queries=2, size=12)
    assert not algos[0].folds(batch) and algos[1].folds(batch)
    out, after = [], []
    for algo in algos:
        torch.manual_seed(7)  # the minibatch orders come from torch's generator: the same draws on both sides
        out.append(algo.meta_step(batch))
        after.append(torch.rand(3))
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=0)  # and the same number of them
    for k in out[0]:
        torch.testing.assert_close(out[0][k], out[1][k], rtol=1e-9, atol=1e-10)
    for (name, a), (_, b) in zip(algos[0].named_parameters(), algos[1].named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=name)
    scores = [algo.evaluate(batch) for algo in algos]
    for k in scores[0]:
        torch.testing.assert_close(scores[0][k], scores[1][k], rtol=1e-9, atol=1e-10)


def test_auto_folds_vectors_on_cpu_and_loops_images():
    info = ProblemInfo(input_shape=(1,), ways=1, num_train_classes=0, task="regression", output_size=1)
    algo = reptile.build(reptile.Config(), mlp.build(mlp.Config(), (1,)), info)
    assert algo.folds(vector_batch(0, 2, 3, 3))
    info = ProblemInfo(input_shape=(1, 12, 12), ways=3, num_train_classes=10)
    algo = reptile.build(reptile.Config(), conv4.build(conv4.Config(hidden=8, layers=2), (1, 12, 12)), info)
    assert not algo.folds(random_batch(0, tasks=2, ways=3, shots=1, queries=1, size=12))
