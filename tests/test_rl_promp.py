"""ProMP (algo=promp): the LVC inner step (maml_rl's VPG gradient, another Hessian), several updates on one batch's
cached episodes, the adaptive KL coefficients in the model's state, the config checks, learning on 2D navigation
through the CLI, and kill -9 + resume bit for bit (with the logged inner KL)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import describe, kill_and_resume, run_cli
from metalearn import distributed, engine, report
from metalearn.algorithms import maml_rl, promp
from metalearn.algorithms.base import ProblemInfo
from metalearn.algorithms.policy_gradient import advantages, log_prob, mean_kl, rollout
from metalearn.config import to_run_config
from metalearn.data import navigation2d
from metalearn.data.environments import EnvTasks, episode_noise
from metalearn.errors import ConfigError
from metalearn.models import mlp

NAV = ProblemInfo(input_shape=(2,), ways=1, num_train_classes=0, task="reinforcement", output_size=2)


def build(module, dtype=torch.float32, hidden=(8,), **cfg):
    torch.manual_seed(0)
    algo = module.build(module.Config(**cfg), mlp.build(mlp.Config(hidden=list(hidden)), (2,)), NAV)
    return algo.to(dtype)


class CountingNavigation(navigation2d.Navigation2D):
    """The real 2D navigation, counting its (batched) steps."""

    steps = 0

    def step(self, params, position, action):
        self.steps += 1
        return super().step(params, position, action)


def tasks(batch=3, shots=4, queries=3, horizon=10, dtype=torch.float32, seed=0) -> EnvTasks:
    b = navigation2d.load(navigation2d.Config(horizon=horizon))["train"].sampler(1, shots, queries, batch, seed).sample()
    return EnvTasks(b.support_x.to(dtype), b.support_y, b.query_x.to(dtype), b.query_y, b.classes,
                    env=CountingNavigation(horizon=horizon))


# ---------------------------------------------------------------- the LVC inner step


def test_the_lvc_step_has_maml_rls_gradient_and_the_low_variance_curvature():
    """On the same episodes (float64): the LVC step is maml_rl's VPG step, and the Hessian of J_LVC is the VPG
    surrogate's plus sum_t A_t grad log pi_t grad log pi_t^T (per task, over its steps' count): checked as
    Hessian-vector products against per-step gradients."""
    vpg, lvc = build(maml_rl, torch.float64), build(promp, torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(vpg.parameters(), lvc.parameters()))
    batch = tasks(batch=2, shots=2, queries=1, horizon=5, dtype=torch.float64)
    noise = episode_noise(batch.support_y, 1, 5, 2, torch.float64, torch.device("cpu"))[0]
    episodes = rollout(vpg.policy, vpg.stacked(2, detach=True), batch.env, batch.params, noise, batch.support_y)
    base = {k: v.detach().clone().requires_grad_() for k, v in vpg.stacked(2).items()}
    v = {k: torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype)
         for i, (k, p) in enumerate(base.items())}

    def ascent_and_hvp(algo) -> tuple[dict, dict]:
        new, _ = algo.inner_update(base, episodes, create_graph=True)
        grad = {k: (new[k] - base[k]) / 0.1 for k in base}  # grad J of each task (inner_lr 0.1)
        hvp = torch.autograd.grad(sum((grad[k] * v[k]).sum() for k in base), tuple(base.values()))
        return grad, dict(zip(base, hvp))

    g_vpg, h_vpg = ascent_and_hvp(vpg)
    g_lvc, h_lvc = ascent_and_hvp(lvc)
    for k in base:
        torch.testing.assert_close(g_lvc[k], g_vpg[k], rtol=0, atol=1e-13)
    # The difference of the curvatures, by hand: per task, sum_t A_t (g_t . v) g_t / n with g_t = grad log pi_t.
    adv = advantages(episodes, 0.99, 1.0, "linear", normalize=True)
    logp = log_prob(vpg.policy, base, episodes)
    expected = {k: torch.zeros_like(p) for k, p in base.items()}
    for b in range(2):
        n = episodes.mask[b].sum()
        for e in range(2):
            for t in range(5):
                g = dict(zip(base, torch.autograd.grad(logp[b, e, t], tuple(base.values()), retain_graph=True)))
                along = sum((g[k][b] * v[k][b]).sum() for k in base)
                for k in base:
                    expected[k][b] += adv[b, e, t] * along * g[k][b] / n
    for k in base:
        torch.testing.assert_close(h_lvc[k] - h_vpg[k], expected[k], rtol=1e-9, atol=1e-12)
    difference = torch.cat([(h_lvc[k] - h_vpg[k]).flatten() for k in base]).norm()
    assert difference > 0.1 * torch.cat([h.flatten() for h in h_vpg.values()]).norm()


# ---------------------------------------------------------------- several updates on one batch


def test_the_updates_of_a_batch_reuse_its_episodes_and_the_first_ratio_is_one():
    algo = build(promp, inner_steps=2, ppo_epochs=3)
    assert algo.updates_per_batch == 3
    optimizer = torch.optim.Adam(algo.parameters(), lr=0.01)
    batch = tasks()
    H = batch.env.horizon
    # The first update of a batch runs its episodes: 2 inner steps' support episodes, then the query episodes.
    cache = promp.Cache(batch)
    first = algo.objective(cache)
    assert batch.env.steps == 3 * H and len(cache.support) == 2 and cache.query is not None
    assert torch.equal(first.ratio, torch.ones_like(first.ratio)) and first.kl.abs().max() == 0
    kept = (cache.support[0].episodes, cache.query.episodes, cache.query.logp)
    theta_old = {k: v.detach().clone() for k, v in algo.stacked(3).items()}
    torch.testing.assert_close(cache.support[0].logp, log_prob(algo.policy, theta_old, kept[0]), rtol=0, atol=0)
    (-(first.surrogate - first.penalty).mean()).backward()
    optimizer.step()
    optimizer.zero_grad()
    later = algo.objective(cache)  # theta moved: theta' re-adapted from the same episodes
    assert batch.env.steps == 3 * H
    assert (cache.support[0].episodes, cache.query.episodes, cache.query.logp) == kept
    assert not torch.equal(later.ratio, torch.ones_like(later.ratio)) and later.kl.min() > 0
    assert later.ratio.shape == (3, 3, H)
    # The pre-update KL of inner step 0 is policy_gradient.mean_kl's, between theta_old and theta.
    torch.testing.assert_close(later.kl[0], mean_kl(algo.policy, theta_old, algo.stacked(3), kept[0]))

    # Through meta_step, as the trainer calls it: 3 calls, an optimizer step after each; one set of episodes.
    batch = tasks(seed=1)
    calls = []
    for _ in range(3):
        optimizer.zero_grad()
        calls.append(algo.meta_step(batch))
        assert all(p.grad is not None for p in algo.parameters())
        optimizer.step()
    assert batch.env.steps == 3 * H
    metrics = calls[0]
    assert calls[1] == calls[2] == {}
    assert set(metrics) == {"loss", "return_pre", "return_post", "inner_kl", "inner_kl_coeff",
                            "return_step0", "return_step1", "return_step2"}  # two inner steps: the return after each
    assert all(m.shape == (3,) for m in metrics.values())
    assert metrics["inner_kl"].min() > 0  # filled in by the last update
    algo.meta_step(batch)  # a batch's updates done: a further call runs new episodes
    assert batch.env.steps == 6 * H


def test_the_kl_coefficients_adapt_and_are_part_of_the_models_state(monkeypatch):
    def train_one_batch(lr: float, **cfg) -> promp.ProMP:
        algo = build(promp, inner_steps=2, ppo_epochs=2, **cfg)
        optimizer = torch.optim.SGD(algo.parameters(), lr=lr)
        batch = tasks()
        for _ in range(2):
            optimizer.zero_grad()
            algo.meta_step(batch)
            optimizer.step()
        return algo

    eta = 5e-4
    assert train_one_batch(0.1, adaptive_inner_kl_penalty=True, target_inner_step=1e-6).inner_kl_coeff.tolist() \
        == pytest.approx([2 * eta, 2 * eta])  # KL far above the target: doubled
    assert train_one_batch(1e-6, adaptive_inner_kl_penalty=True).inner_kl_coeff.tolist() \
        == pytest.approx([eta / 2, eta / 2])  # far below: halved
    fixed = train_one_batch(0.1, target_inner_step=1e-6)
    assert fixed.inner_kl_coeff.tolist() == pytest.approx([eta, eta])  # the reference's experiments: fixed
    adapted = train_one_batch(0.1, adaptive_inner_kl_penalty=True, target_inner_step=1e-6)
    state = adapted.state_dict()
    assert state["inner_kl_coeff"].tolist() == pytest.approx([2 * eta, 2 * eta])
    fresh = build(promp, inner_steps=2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.inner_kl_coeff, adapted.inner_kl_coeff)
    with pytest.raises(ConfigError, match="needs algo.ppo_epochs >= 2"):
        build(promp, adaptive_inner_kl_penalty=True, ppo_epochs=1)
    with pytest.raises(ConfigError, match=r"^algo.ppo_epochs must be >= 1 and algo.clip in \(0, 1\) \(got 5, 1.5\)$"):
        build(promp, clip=1.5)  # the range maml_rl and rl2 check too (policy_gradient.check_pg_config)
    with pytest.raises(ConfigError, match=r"^algo.baseline='value' is not one of: linear, loo, none$"):
        build(promp, baseline="value")
    other = torch.nn.Identity()
    other.out_features = 2
    with pytest.raises(ConfigError, match="algo=promp's policy network is backbone=mlp"):
        promp.build(promp.Config(), other, NAV)
    # Several processes (torchrun): the adaptive rule is refused when training, never when building (metalearn eval).
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    adaptive = build(promp, adaptive_inner_kl_penalty=True)
    cfg = to_run_config({"algo": {"name": "promp"}, "data": {"name": "navigation2d"}, "backbone": {"name": "mlp"}})
    with pytest.raises(ConfigError, match=r"^algo.adaptive_inner_kl_penalty=true needs the whole meta-batch in one "):
        adaptive.check_training(cfg)
    fixed.check_training(cfg)  # fixed coefficients: per task, the ranks' mean is the batch's


# ---------------------------------------------------------------- through the CLI

LEARN = ["algo=promp", "data=navigation2d", "data.horizon=50", "backbone.hidden=[32,32]", "shots=10", "queries=10",
         "meta_batch_size=10", "steps=25", "optim.lr=0.003", "eval.shots=20", "eval.queries=20",
         "trainer.val_every=25", "trainer.val_episodes=10", "trainer.test_episodes=40", "trainer.log_every=5",
         "trainer.progress=false"]


def test_promp_learns_to_adapt_to_2d_navigation_through_the_cli(tmp_path):
    """25 batches (10 tasks x 10 episodes, 5 updates each, horizon 50, a 32-32 policy; about 11 s, 6.4 s of CPU).
    On 40 held-out goals the return after one LVC step is well above the return before it and far above a random
    policy's. Measured (seeds 0, 1, 2): before -21.0 / -21.0 / -21.6, after -11.0 / -13.9 / -12.9; a randomly
    initialised policy -35.3 after one step."""
    proc = run_cli(["train", *LEARN, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    test = json.loads((tmp_path / "run" / "results.json").read_text())["test"]
    before, after = test["return_step0"], test["return_step1"]
    assert after["mean"] - before["mean"] > max(4.0, after["ci95"] + before["ci95"]), test
    # A randomly initialised policy of the same configuration, on 40 test goals.
    cfg = to_run_config({"algo": {"name": "promp"}, "data": {"name": "navigation2d", "horizon": 50},
                         "backbone": {"name": "mlp", "hidden": [32, 32]}, "device": {"type": "cpu"}})
    engine.seed_everything(0)
    stores = engine.load_data(cfg, torch.device("cpu"))
    random_policy = engine.build_algorithm(cfg, stores["train"])
    episodes = stores["test"].sampler(1, 20, 20, 40, cfg.trainer.eval_seed + 1).sample()
    assert after["mean"] > float(random_policy.evaluate(episodes)["return_step1"].mean()) + 12, test


TINY_PROMP = ["algo=promp", "data=navigation2d", "data.horizon=20", "backbone.hidden=[16,16]", "shots=4", "queries=4",
              "meta_batch_size=4", "steps=6", "trainer.log_every=2", "trainer.val_every=2", "trainer.val_episodes=4",
              "trainer.test_episodes=8", "trainer.ckpt_every=2", "trainer.progress=false",
              "algo.adaptive_inner_kl_penalty=true", "algo.ppo_epochs=3", "optim.lr=0.01"]


def test_train_kill_resume_bit_for_bit_through_the_cli(tmp_path):
    """``metalearn train algo=promp`` killed (SIGKILL) inside meta-step 5 (after the batch's first update's
    backward) and resumed from step 4 ends bit for bit where an uninterrupted run ends: weights, Adam's state,
    and the adapted KL coefficients, which the checkpoint holds. The default tier's one kill/resume of an
    algorithm with several updates a batch (maml_rl's outer=ppo and RL^2's are in the slow tier). The trainer
    logs the inner KL the batch's last update wrote into its first update's metrics: not 0, which the first
    update's own KL always is."""
    a, b, results, _ = kill_and_resume(TINY_PROMP, tmp_path)
    assert a["step"] == b["step"] == 6
    assert not torch.equal(a["model"]["inner_kl_coeff"], torch.tensor([5e-4]))  # it did adapt
    assert list(results[0]["test"]) == ["return_step0", "return_step1", "return"]
    logged = [report.read_scalars(tmp_path / run)["train/inner_kl"] for run in ("whole", "run")]
    assert [step for step, _ in logged[0]] == [2, 4, 6] and all(kl > 0 for _, kl in logged[0]), logged
    assert logged[0] == logged[1]
