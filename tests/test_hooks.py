"""The gradient-based family's hooks (MAML.inner_update, inner_loss, outer_loss): a variant is a subclass of a few
lines, not a copy of maml.py. The hooked path is exact against MAML's own; a 20-line inner-Adam plug-in trains
through the CLI from a package outside the repository."""

from __future__ import annotations

import json
import textwrap

import torch

from conftest import TINY, cli_env, describe, run_cli
from metalearn.algorithms import ProblemInfo, maml
from metalearn.models import conv4
from plainops import random_batch

INNER_ADAM = textwrap.dedent('''
    """MAML whose inner loop is Adam (bias-corrected moments per task), a user plug-in."""
    from dataclasses import dataclass

    from metalearn.algorithms import maml


    @dataclass
    class Config(maml.Config):
        name: str = "maml_adam"
        inner_lr: float = 0.01
        betas: tuple = (0.9, 0.999)


    class InnerAdamMAML(maml.MAML):
        def inner_update(self, params, grads, step, state):
            (b1, b2), t = self.cfg.betas, step + 1
            m = {k: b1 * state.get("m", {}).get(k, 0) + (1 - b1) * g for k, g in grads.items()}
            v = {k: b2 * state.get("v", {}).get(k, 0) + (1 - b2) * g * g for k, g in grads.items()}
            state.update(m=m, v=v)
            # eps inside the root: sqrt's derivative at 0 (a weight with no gradient) would be inf
            return {k: p - self.cfg.inner_lr * (m[k] / (1 - b1 ** t)) / (v[k] / (1 - b2 ** t) + 1e-16).sqrt()
                    for k, p in params.items()}


    def build(cfg, backbone, info):
        return InnerAdamMAML(cfg, backbone, info)
''')


class SameRule(maml.MAML):
    """Overrides every hook with MAML's own rule: must give MAML's numbers through the hooked loop."""

    def inner_update(self, params, grads, step, state):
        state["steps"] = state.get("steps", 0) + 1
        return super().inner_update(params, grads, step, state)

    def inner_loss(self, outputs, targets, params):
        return super().inner_loss(outputs, targets, params)


def _pair(first_order: bool):
    torch.manual_seed(0)
    cfg = maml.Config(inner_steps=2, test_inner_steps=2, first_order=first_order, batched="loop")
    info = ProblemInfo(input_shape=(1, 12, 12), ways=3, num_train_classes=10)
    backbone = conv4.build(conv4.Config(hidden=8, layers=2), info.input_shape)
    plain = maml.MAML(cfg, backbone, info).double()
    hooked = SameRule(cfg, conv4.build(conv4.Config(hidden=8, layers=2), info.input_shape), info).double()
    hooked.load_state_dict(plain.state_dict())
    assert hooked.hooked and not plain.hooked
    return plain, hooked


def test_the_hooked_path_gives_mamls_meta_gradients_and_scores():
    batch = random_batch(1, tasks=3, ways=3, shots=2, queries=2, size=12)
    for first_order in (False, True):
        plain, hooked = _pair(first_order)
        out = [algo.meta_step(batch) for algo in (plain, hooked)]
        torch.testing.assert_close(out[0]["loss"], out[1]["loss"], rtol=0, atol=1e-12)
        for (name, a), (_, b) in zip(plain.named_parameters(), hooked.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)
        scores = [algo.evaluate(batch) for algo in (plain, hooked)]
        torch.testing.assert_close(scores[0]["accuracy"], scores[1]["accuracy"])
        torch.testing.assert_close(scores[0]["loss"], scores[1]["loss"], rtol=0, atol=1e-10)


def test_an_inner_adam_plugin_of_a_few_lines_trains_through_the_cli(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "inner_adam.py").write_text(INNER_ADAM)
    assert len([line for line in INNER_ADAM.splitlines() if line.strip()]) <= 24
    (tmp_path / "conf" / "algo").mkdir(parents=True)
    (tmp_path / "conf" / "algo" / "maml_adam.yaml").write_text(  # maml's options, and its own
        "defaults:\n  - maml\n  - _self_\nname: maml_adam\nmodule: inner_adam\ninner_lr: 0.01\nbetas: [0.9, 0.999]\n")
    bare = tmp_path / "bare"
    (bare / "algo").mkdir(parents=True)
    (bare / "algo" / "maml_adam.yaml").write_text("name: maml_adam\nmodule: inner_adam\n")
    proc = run_cli(["train", "--config-dir", str(bare), "algo=maml_adam", "algo.inner_lr=0.005", *TINY], cwd=tmp_path,
                   env=cli_env(PYTHONPATH=str(tmp_path / "src")))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "+algo.inner_lr=" in proc.stderr, describe(proc)
    run = tmp_path / "run"
    proc = run_cli(["train", "--config-dir", str(tmp_path / "conf"), "algo=maml_adam", "algo.inner_lr=0.005", *TINY,
                    f"hydra.run.dir={run}"], cwd=tmp_path, env=cli_env(PYTHONPATH=str(tmp_path / "src")))
    assert proc.returncode == 0, describe(proc)
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["accuracy"]["episodes"] == 4

    import sys

    sys.path.insert(0, str(tmp_path / "src"))
    try:
        import inner_adam
    finally:
        sys.path.remove(str(tmp_path / "src"))
    # the adapted weights are Adam's: the first step moves every weight by about inner_lr (sign of its gradient)
    info = ProblemInfo(input_shape=(1, 12, 12), ways=3, num_train_classes=10)
    algo = inner_adam.build(inner_adam.Config(inner_lr=0.01), conv4.build(conv4.Config(hidden=8, layers=2), (1, 12, 12)),
                            info).double()
    batch = random_batch(2, tasks=1, ways=3, shots=2, queries=2, size=12)
    params = dict(algo.net.named_parameters())
    x, y = batch.support_x[0], batch.support_y[0]
    adapted = algo.adapt_task(x, y, params, steps=1, create_graph=False)
    step = (params["1.weight"] - adapted["1.weight"]).abs()
    assert torch.allclose(step, torch.full_like(step, 0.01), rtol=1e-3)
