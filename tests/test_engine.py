"""Engine pieces used by every algorithm: the outer optimizer's learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from metalearn import engine
from metalearn.config import to_run_config


def run_config(steps: int, **optim):
    return to_run_config({"algo": {"name": "protonet"}, "data": {"name": "glyphs"}, "backbone": {"name": "conv4"},
                          "steps": steps, "optim": {"name": "sgd", **optim}})


def lrs(scheduler: str, steps: int, lr: float = 0.5, **optim) -> list[float]:
    """The learning rate of each of the ``steps`` meta-steps."""
    cfg = run_config(steps, lr=lr, scheduler=scheduler, **optim)
    opt, sched = engine.build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_constant():
    assert lrs("constant", 5) == [0.5] * 5


def test_linear_anneals_to_zero_over_the_run():
    # Reptile's rule: epsilon * (1 - i / steps) at meta-step i
    assert lrs("linear", 4) == pytest.approx([0.5, 0.375, 0.25, 0.125])


def test_cosine():
    got = lrs("cosine", 4)
    assert got == pytest.approx([0.25 * (1 + math.cos(math.pi * i / 4)) for i in range(4)])


def test_step():
    assert lrs("step", 5, decay_every=2, decay_gamma=0.1) == pytest.approx([0.5, 0.5, 0.05, 0.05, 0.005])


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "step"])
def test_schedule_resumes_from_its_state(scheduler):
    """A resumed run continues the schedule where it stopped (the checkpoint holds the scheduler's state)."""
    cfg = run_config(6, lr=0.5, scheduler=scheduler, decay_every=2)
    p = torch.nn.Parameter(torch.zeros(1))
    opt, sched = engine.build_optimizer(cfg, [p])
    for _ in range(3):
        opt.step()
        sched.step()
    opt2, sched2 = engine.build_optimizer(cfg, [p])
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for _ in range(3):
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
        opt.step(), sched.step(), opt2.step(), sched2.step()
