"""The outer optimizer and schedule: today's short names, every torch.optim class by name, and any class (torch's or
the user's) by Hydra's _target_ convention (engine.build_optimizer)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, cli_env, describe, run_cli
from metalearn import engine
from metalearn.config import to_run_config
from metalearn.errors import ConfigError

SIGN_SGD = '''
import torch


class SignSGD(torch.optim.Optimizer):
    """A user's optimizer: steps by the sign of the gradient."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])
'''


def config(**optim):
    return to_run_config({"algo": {"name": "protonet"}, "data": {"name": "glyphs"}, "backbone": {"name": "conv4"},
                          "steps": 100, "optim": optim})


def test_short_names_and_any_torch_optim_class_by_name():
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt, sched = engine.build_optimizer(config(), params)
    assert type(opt) is torch.optim.Adam and opt.defaults["lr"] == 1e-3
    opt, _ = engine.build_optimizer(config(name="sgd", momentum=0.5, lr=0.1), params)
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.5
    opt, _ = engine.build_optimizer(config(name="adamw", weight_decay=0.01), params)
    assert type(opt) is torch.optim.AdamW and opt.defaults["weight_decay"] == 0.01
    with pytest.raises(ConfigError, match="optim.name='adamx' is not one of: .*adamw"):
        config(name="adamx")
    with pytest.raises(ConfigError, match="optim.name='lbfgs' is not one of"):  # needs a closure: by _target_ only
        config(name="lbfgs")


def test_target_nodes_build_any_optimizer_and_scheduler():
    params = [torch.nn.Parameter(torch.zeros(3))]
    cfg = config(lr=0.01, optimizer={"_target_": "torch.optim.AdamW", "betas": [0.8, 0.9]},
                 lr_scheduler={"_target_": "torch.optim.lr_scheduler.OneCycleLR", "max_lr": 0.1, "total_steps": 100})
    opt, sched = engine.build_optimizer(cfg, params)
    assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.8, 0.9)
    assert type(sched) is torch.optim.lr_scheduler.OneCycleLR and sched.total_steps == 100
    opt, _ = engine.build_optimizer(config(lr=0.01, optimizer={"_target_": "torch.optim.SGD", "lr": 0.5}), params)
    assert opt.defaults["lr"] == 0.5  # the node's lr wins over optim.lr
    with pytest.raises(ConfigError, match="optim.optimizer._target_=torch.optim.Adamm cannot be imported"):
        config(optimizer={"_target_": "torch.optim.Adamm"})
    with pytest.raises(ConfigError, match="optim.lr_scheduler needs _target_"):
        config(lr_scheduler={"max_lr": 0.1})
    with pytest.raises(ConfigError, match=r"optim.optimizer \(torch.optim.AdamW\): .*betaz"):
        engine.build_optimizer(config(optimizer={"_target_": "torch.optim.AdamW", "betaz": 1}), params)


def test_a_users_optimizer_class_trains_and_resumes_through_the_cli(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "signsgd.py").write_text(SIGN_SGD)
    env = cli_env(PYTHONPATH=str(tmp_path / "src"))
    run = tmp_path / "run"
    args = ["train", "algo=protonet", *TINY, "optim.optimizer={_target_:signsgd.SignSGD,lr:0.0005}",
            "optim.lr_scheduler={_target_:torch.optim.lr_scheduler.StepLR,step_size:1,gamma:0.5}", f"hydra.run.dir={run}"]
    proc = run_cli([*args, "trainer.stop_at=2"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, describe(proc)
    proc = run_cli(["train", f"resume={run}"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, describe(proc)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["scheduler"]["last_epoch"] == 4
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0005 * 0.5 ** 4)
    assert json.loads((run / "results.json").read_text())["steps"] == 4
    proc = run_cli(["train", "algo=protonet", *TINY, "optim.optimizer={_target_:torch.optim.AdamW,betaz:1}"],
                   cwd=tmp_path, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "betaz" in proc.stderr, describe(proc)


def test_lr_multipliers_give_parts_of_the_algorithm_their_own_rate():
    from metalearn.algorithms.feat import FEAT, Config
    from metalearn.algorithms.base import ProblemInfo
    from metalearn.models.conv4 import Config as Conv4, build

    model = FEAT(Config(), build(Conv4(hidden=8), (1, 28, 28)), ProblemInfo(input_shape=(1, 28, 28), ways=5, num_train_classes=10))
    cfg = config(lr=0.01, lr_multipliers={"set_function": 10, "set_function.norm": 0.5}, scheduler="step",
                 decay_every=1, decay_gamma=0.5)
    opt, sched = engine.build_optimizer(cfg, model.named_parameters())
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lrs[id(named["backbone.convs.0.weight"])] == 0.01
    assert lrs[id(named["set_function.q.weight"])] == pytest.approx(0.1)
    assert lrs[id(named["set_function.norm.weight"])] == pytest.approx(0.005)  # the longest prefix wins
    opt.step()  # no gradients: a no-op, in the order torch expects
    sched.step()
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([0.0025, 0.005, 0.05])  # schedules scale all
    with pytest.raises(ConfigError, match=r"optim.lr_multipliers.head names no parameter of algo=protonet; its "
                                          r"parameters are under: backbone, set_function"):
        engine.build_optimizer(config(lr_multipliers={"head": 2}), model.named_parameters())
    with pytest.raises(ConfigError, match=r"optim.lr_multipliers.head must be a positive factor \(got 0.0\)"):
        config(lr_multipliers={"head": 0})
