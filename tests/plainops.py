"""Plain-ops helpers shared by the algorithm tests: random episodes, a parameter snapshot, and conv4
written out with torch.nn.functional (the independent re-computation the algorithms are checked against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metalearn.data import TaskBatch


def params_of(algo) -> dict:
    """A detached copy of every meta-parameter, by name."""
    return {k: v.detach().clone() for k, v in algo.named_parameters()}


def random_batch(seed: int, tasks: int, ways: int, shots: int, queries: int, size: int,
                 classes_of=None) -> TaskBatch:
    """float64 episodes of 1 x size x size images: each class a random prototype plus noise, labels shuffled
    per task, ``classes`` drawn from 10, or ``classes_of(generator)`` ([tasks, ways] global class ids)."""
    g = torch.Generator().manual_seed(seed)

    def labels(k):
        y = torch.arange(ways).repeat_interleave(k)
        return torch.stack([y[torch.randperm(len(y), generator=g)] for _ in range(tasks)])

    sy, qy = labels(shots), labels(queries)
    protos = torch.rand(tasks, ways, 1, size, size, generator=g, dtype=torch.float64)

    def images(y):
        base = protos[torch.arange(tasks)[:, None], y]
        return (0.6 * base + 0.4 * torch.rand(base.shape, generator=g, dtype=torch.float64)).clamp(0, 1)

    classes = classes_of(g) if classes_of else torch.stack([torch.randperm(10, generator=g)[:ways] for _ in range(tasks)])
    return TaskBatch(images(sy), sy, images(qy), qy, classes)


def conv4_body(p: dict, x: torch.Tensor, layers: int) -> torch.Tensor:
    """conv4 written out: [n, C, H, W] -> [n, F], batch statistics of this set."""
    for i in range(layers):
        x = F.conv2d(x, p[f"backbone.convs.{i}.weight"], p[f"backbone.convs.{i}.bias"], padding=1)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        x = (x - mean) / torch.sqrt(var + 1e-5)
        x = x * p[f"backbone.norms.{i}.weight"].view(1, -1, 1, 1) + p[f"backbone.norms.{i}.bias"].view(1, -1, 1, 1)
        x = F.max_pool2d(torch.clamp(x, min=0), 2)
    return x.flatten(1)
