"""Many tasks' networks in one forward pass: per-task weights, one batch of tasks.

MAML-type algorithms run the same network with *different* weights per task
(each task's adapted copy). Looping over tasks runs one small network per task;
this module instead runs all of them at once on a ``[T, n, ...]`` batch with
weights stacked per task, ``{name: [T, *shape]}``, with the same parameter
names as the module (``functional_call`` names), so the result is the per-task
loop's, computed by fewer, larger kernels:

* conv: the tasks sit side by side in the channel dimension, ``[n, T*C, H, W]``,
  and one grouped convolution (``groups=T``) applies task t's filters to task t's
  channels only;
* per-task BatchNorm: in that layout a (task, channel) pair *is* a channel, so
  plain ``F.batch_norm`` over ``T*C`` channels normalises every task with its own
  batch statistics (as ``TaskBatchNorm``), with no transposes at all;
* linear: a batched matrix product, ``[T, n, F] @ [T, F, out]``.

Every operation is an ordinary differentiable op, so ``torch.autograd.grad``
(first and second order) works through it; with weights
``theta.expand(T, *theta.shape)`` the gradient of the *sum* of the task losses
with respect to the stacked weights is, row by row, each task's own gradient.

``task_batched_forward(net)`` returns the batched function for the networks it
knows (``nn.Sequential(Conv4 | MLP, nn.Linear)``, MAML's network), else None.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.models import ops
from metalearn.models.conv4 import Conv4
from metalearn.models.mlp import MLP

#: (stacked parameters {name: [T, *shape]}, inputs [T, n, ...]) -> outputs [T, n, out]
BatchedForward = Callable[[dict, torch.Tensor], torch.Tensor]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-task linear layer: [T, n, F], [T, out, F], [T, out] -> [T, n, out]."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def conv4_features(net: Conv4, params: dict, x: torch.Tensor, prefix: str = "") -> torch.Tensor:
    """Conv4's features of every task with its own weights: [T, n, C, H, W] -> [T, n, F].

    ``params[prefix + "convs.0.weight"]`` is [T, out, in, 3, 3], and so on.
    """
    tasks, n = x.shape[:2]
    # [T, n, C, H, W] -> [n, T*C, H, W]: task t owns channels t*C .. t*C + C - 1.
    h = x.transpose(0, 1).reshape(n, tasks * x.shape[2], *x.shape[3:])
    for i in range(len(net.convs)):
        w, b = params[f"{prefix}convs.{i}.weight"], params[f"{prefix}convs.{i}.bias"]
        if net.norms is not None:
            gamma, beta, eps = params[f"{prefix}norms.{i}.weight"], params[f"{prefix}norms.{i}.bias"], net.norms[i].eps
        if i == 0 and net.norms is not None and not x.requires_grad and ops.enabled(x):
            # The input images: conv + per-task BatchNorm as one grouped convolution (models/ops.py).
            h = ops.conv_batchnorm(x.flatten(0, 1), w, b, gamma, beta, eps, tasks)
        else:
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), b.reshape(-1), padding=1, groups=tasks)
            if net.norms is not None:
                # Statistics per (task, channel) over the task's n examples and pixels: per-task BatchNorm.
                h = F.batch_norm(h, None, None, gamma.reshape(-1), beta.reshape(-1), training=True, eps=eps)
        h = ops.pool_relu(h, pool=i < net.pool_layers)  # max-pool, then ReLU (see Conv4)
    # [n, T*C, h, w] -> [T, n, C*h*w], the per-task flatten order of Conv4.
    return h.reshape(n, tasks, -1).transpose(0, 1)


def mlp_features(net: MLP, params: dict, x: torch.Tensor, prefix: str = "") -> torch.Tensor:
    """The MLP's features of every task with its own weights: [T, n, d] -> [T, n, F]."""
    for i in range(len(net.layers)):
        x = F.relu(linear(x, params[f"{prefix}layers.{i}.weight"], params[f"{prefix}layers.{i}.bias"]))
    return x


def task_batched_forward(net: nn.Module) -> BatchedForward | None:
    """The batched forward of ``nn.Sequential(backbone, nn.Linear)`` for a known backbone, else None."""
    if not (isinstance(net, nn.Sequential) and len(net) == 2 and isinstance(net[1], nn.Linear)):
        return None
    body = net[0]
    if type(body) is Conv4:
        features = conv4_features
    elif type(body) is MLP:
        features = mlp_features
    else:
        return None

    def forward(params: dict, x: torch.Tensor) -> torch.Tensor:
        return linear(features(body, params, x, prefix="0."), params["1.weight"], params["1.bias"])

    return forward
