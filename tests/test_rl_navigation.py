"""Reinforcement learning as a task kind: the 2D navigation tasks, the policy-gradient pieces, MAML for RL
(its meta-gradient checked exact against finite differences), learning, and the CLI (train, kill -9, resume
bit for bit, eval)."""

from __future__ import annotations

import itertools
import json
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import cli_env, describe, run_cli
from metalearn import engine
from metalearn.algorithms import maml_rl
from metalearn.algorithms.base import ProblemInfo
from metalearn.algorithms.policy_gradient import (GaussianPolicy, Rollouts, advantages, discounted_cumsum,
                                                  linear_baseline, baseline_features, rollout)
from metalearn.config import to_run_config
from metalearn.data import navigation2d
from metalearn.data.environments import EnvTasks, episode_noise
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models import mlp

NAV = ProblemInfo(input_shape=(2,), ways=1, num_train_classes=0, task="reinforcement", output_size=2)


def sampler(split="train", shots=3, queries=2, batch=5, seed=0, **cfg):
    return navigation2d.load(navigation2d.Config(**cfg))[split].sampler(1, shots, queries, batch, seed)


# ---------------------------------------------------------------- the environment and its tasks


def test_dynamics_and_reward_by_hand():
    env = navigation2d.Navigation2D()
    goal = torch.tensor([[0.3, -0.4]], dtype=torch.float64)
    pos, obs = env.reset(goal, torch.zeros(1, 1, dtype=torch.long))
    assert pos.tolist() == [[[0.0, 0.0]]] and obs.tolist() == [[[0.0, 0.0]]]
    pos, obs, reward, done = env.step(goal, pos, torch.tensor([[[0.5, 0.05]]], dtype=torch.float64))  # x clipped
    assert torch.allclose(pos, torch.tensor([[[0.1, 0.05]]], dtype=torch.float64))
    assert math.isclose(reward.item(), -math.hypot(0.2, 0.45), rel_tol=1e-12) and not done.item()
    pos, obs, reward, done = env.step(goal, pos, torch.tensor([[[-0.02, -3.0]]], dtype=torch.float64))
    assert torch.allclose(obs, torch.tensor([[[0.08, -0.05]]], dtype=torch.float64))
    assert math.isclose(reward.item(), -math.hypot(0.22, 0.35), rel_tol=1e-12)
    # Within 0.01 of the goal in both coordinates ends the episode (the reward of that step still counts).
    goal = torch.tensor([[0.1, 0.1]], dtype=torch.float64)
    _, _, reward, done = env.step(goal, torch.zeros(1, 1, 2, dtype=torch.float64),
                                  torch.tensor([[[0.1, 0.095]]], dtype=torch.float64))
    assert done.item() and math.isclose(reward.item(), -0.005, rel_tol=1e-9)


def test_rollouts_stop_at_the_goal_and_mask_the_rest():
    """A deterministic policy (mean (0.1, 0), no noise) walks to a goal at (0.3, 0): three steps, then the mask."""
    env = navigation2d.Navigation2D(horizon=6)
    policy = GaussianPolicy(lambda params, obs: params["bias"][:, None, :].expand(*obs.shape[:2], 2))
    params = {"bias": torch.tensor([[0.1, 0.0], [0.1, 0.0]], dtype=torch.float64),
              "log_std": torch.zeros(2, 2, dtype=torch.float64)}
    goals = torch.tensor([[0.3, 0.0], [0.25, 0.0]], dtype=torch.float64)
    episodes = rollout(policy, params, env, goals, torch.zeros(2, 1, 6, 2, dtype=torch.float64),
                       torch.zeros(2, 1, dtype=torch.long))
    assert episodes.mask[0, 0].tolist() == [1, 1, 1, 0, 0, 0] and episodes.mask[1, 0].tolist() == [1] * 6
    torch.testing.assert_close(episodes.rewards[0, 0], torch.tensor([-0.2, -0.1, 0, 0, 0, 0], dtype=torch.float64))
    # The goal at 0.25 is never within 0.01: the agent passes it and walks on.
    torch.testing.assert_close(episodes.rewards[1, 0], -torch.tensor([0.15, 0.05, 0.05, 0.15, 0.25, 0.35],
                                                                     dtype=torch.float64))
    torch.testing.assert_close(episodes.returns(), torch.tensor([-0.3, -1.0], dtype=torch.float64))
    assert episodes.obs[0, 0, :3, 0].tolist() == pytest.approx([0.0, 0.1, 0.2])


def test_task_batches_are_reproducible_resumable_and_keep_their_environment():
    s = sampler(batch=400, shots=3, queries=2)
    b = s.sample()
    assert isinstance(b, EnvTasks) and b.support_x.shape == (400, 3, 2) and b.query_x.shape == (400, 2, 2)
    assert b.support_y.shape == (400, 3) and b.support_y.dtype == torch.long and b.classes.shape == (400, 0)
    assert (b.shots, b.queries) == (3, 2) and torch.equal(b.support_x[:, 1], b.params)
    assert b.params.min() >= -0.5 and b.params.max() <= 0.5 and b.params.max() - b.params.min() > 0.95
    assert len(set(torch.cat([b.support_y, b.query_y], 1).flatten().tolist())) == 400 * 5  # a seed per episode
    # Slicing, concatenation and moving keep the environment (what the engine does to batches).
    part = b[1:3]
    for other in (part, TaskBatch.cat([part, b[5:6]]), part.to("cpu")):
        assert isinstance(other, EnvTasks) and other.env is b.env
    assert TaskBatch.cat([part, b[5:6]]).num_tasks == 3
    state = s.state_dict()
    expected = s.sample()
    s.load_state_dict(state)
    assert torch.equal(s.sample().support_y, expected.support_y)
    assert torch.equal(sampler(seed=3).sample().params, sampler(seed=3).sample().params)
    assert not torch.equal(sampler(seed=3).sample().params, sampler(seed=4).sample().params)


def test_fixed_task_sets_per_split():
    train = sampler("train", batch=200, num_tasks=4, task_seed=1).sample().params
    test = sampler("test", batch=200, num_tasks=4, task_seed=1).sample().params
    assert len(set(map(tuple, train.tolist()))) == 4 and len(set(map(tuple, test.tolist()))) == 4
    assert not set(map(tuple, train.tolist())) & set(map(tuple, test.tolist()))
    with pytest.raises(ConfigError, match="goal_low must be <= data.goal_high"):
        navigation2d.load(navigation2d.Config(goal_low=1.0))


def test_an_episodes_noise_is_its_seeds_alone():
    seeds = torch.tensor([[5, 6, 7], [8, 9, 10]])
    both = episode_noise(seeds, 2, 4, 2, torch.float32, torch.device("cpu"))
    assert both.shape == (2, 2, 3, 4, 2)
    one = episode_noise(seeds[1:, 2:], 2, 4, 2, torch.float32, torch.device("cpu"))
    assert torch.equal(both[:, 1, 2], one[:, 0, 0])
    assert not torch.equal(both[0], both[1])  # each inner step its own block
    # Block j does not depend on how many blocks are drawn (1 or 3 adaptation steps at eval), at the default
    # horizon too (100 x 2 numbers: a single draw of all blocks would redraw the end of the first block).
    for horizon in (4, 100):
        one, three = (episode_noise(seeds, k, horizon, 2, torch.float64, torch.device("cpu")) for k in (1, 3))
        assert torch.equal(one[0], three[0])


# ---------------------------------------------------------------- baseline and advantages


def fake_rollouts(B=2, E=4, H=5, O=2, seed=0) -> Rollouts:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, E, H, dtype=torch.float64)
    mask[0, 1, 3:] = 0  # an episode that ended after 3 steps
    return Rollouts(torch.randn(B, E, H, O, generator=g, dtype=torch.float64), torch.zeros(B, E, H, 2),
                    torch.randn(B, E, H, generator=g, dtype=torch.float64) * mask, mask)


def test_linear_baseline_is_a_ridge_fit_on_rllabs_features_and_its_leave_one_out_fit():
    r = fake_rollouts()
    f = baseline_features(r.obs)
    assert f.shape == (2, 4, 5, 8)
    assert torch.allclose(f[0, 0, 2], torch.cat([r.obs[0, 0, 2], r.obs[0, 0, 2] ** 2,
                                                 torch.tensor([0.02, 0.0004, 0.000008, 1.0], dtype=torch.float64)]))
    # Per task, the ridge regression (X'X + 1e-5 I) c = X'y over the steps of its episodes (the ended one's
    # first 3); leave one out: each episode's values from a fit on the task's other episodes.
    whole, loo = linear_baseline(r, r.rewards), linear_baseline(r, r.rewards, leave_one_out=True)

    def fit(b: int, rows: list[int]) -> torch.Tensor:
        X = (f[b, rows] * r.mask[b, rows, :, None]).reshape(-1, 8)
        return torch.linalg.solve(X.T @ X + 1e-5 * torch.eye(8, dtype=torch.float64), X.T @ r.rewards[b, rows].reshape(-1))

    for b, e in itertools.product(range(2), range(4)):
        torch.testing.assert_close(whole[b, e], f[b, e] @ fit(b, [0, 1, 2, 3]) * r.mask[b, e])
        torch.testing.assert_close(loo[b, e], f[b, e] @ fit(b, [k for k in range(4) if k != e]) * r.mask[b, e])
    assert whole[0, 1, 3:].tolist() == [0.0, 0.0]


def test_advantages_against_a_plain_loop():
    r = fake_rollouts()
    gamma, lam = 0.9, 0.8
    adv = advantages(r, gamma, lam, "linear", normalize=False)
    to_go = discounted_cumsum(r.rewards, gamma)
    values = linear_baseline(r, to_go)
    B, E, H = r.rewards.shape
    for b, e in itertools.product(range(B), range(E)):
        running, expected = 0.0, [0.0] * H
        for t in reversed(range(H)):
            if not r.mask[b, e, t]:
                continue
            next_value = values[b, e, t + 1] * r.mask[b, e, t + 1] if t + 1 < H else 0.0
            delta = r.rewards[b, e, t] + gamma * next_value - values[b, e, t]
            running = delta + gamma * lam * running
            expected[t] = float(running)
        assert adv[b, e].tolist() == pytest.approx(expected, abs=1e-12)
    # lambda = 1: returns-to-go minus the baseline; normalised: mean 0, std 1 over each task's steps.
    torch.testing.assert_close(advantages(r, gamma, 1.0, "linear", False), (to_go - values) * r.mask)
    normed = advantages(r, gamma, 1.0, "none", True)
    n = r.mask.sum((1, 2))
    torch.testing.assert_close(normed.sum((1, 2)) / n, torch.zeros(B, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close((normed ** 2).sum((1, 2)) / n, torch.ones(B, dtype=torch.float64), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- the meta-gradient


class Line:
    """A 1-D task for the exactness check: s' = s + a from s = 0.3, reward exp(-(s' - goal)^2) (smooth and
    bounded, so that the expectations below converge under quadrature)."""

    obs_size = action_size = 1

    def __init__(self, horizon: int):
        self.horizon = horizon

    def reset(self, params, seeds):
        s = params.new_full((params.shape[0], seeds.shape[1], 1), 0.3)
        return s, s

    def step(self, params, s, a):
        s = s + a
        return s, s, torch.exp(-((s - params[:, None, :]) ** 2).sum(-1)), torch.zeros(s.shape[:2], dtype=torch.bool)


def small_policy(**cfg) -> maml_rl.MAMLRL:
    torch.manual_seed(0)
    info = ProblemInfo(input_shape=(1,), ways=1, num_train_classes=0, task="reinforcement", output_size=1)
    cfg = maml_rl.Config(**{"inner_lr": 0.05, "discount": 1.0, "normalize_advantages": False, "init_std": 0.5, **cfg})
    algo = maml_rl.build(cfg, mlp.build(mlp.Config(hidden=[3]), (1,)), info).double()
    with torch.no_grad():
        algo.net[0].layers[0].bias.fill_(1.0)  # every ReLU active where the actions go: a smooth policy
    return algo


def quadrature(dims: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Hermite nodes of N(0, I) in ``dims`` dimensions (n per dimension) and their weights (sum 1)."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    nodes = torch.tensor(list(itertools.product(x, repeat=dims)), dtype=torch.float64)
    weights = torch.tensor([math.prod(c) for c in itertools.product(w / w.sum(), repeat=dims)], dtype=torch.float64)
    return nodes, weights


def meta_gradient_and_finite_difference(horizon, shots, queries, inner_steps, baseline, n, **cfg):
    """(E[the estimate], E[the estimate] . v, the central difference of J along a random direction v): the
    expectations over the action noise by quadrature, each node one task; J(theta) is the quadrature of f itself
    (the noise held fixed at the nodes, the actions moving with theta)."""
    algo = small_policy(baseline=baseline, inner_steps=inner_steps, **cfg)
    support_dims = inner_steps * shots * horizon
    nodes, weights = quadrature(support_dims + queries * horizon, n)
    N = len(weights)
    support = nodes[:, :support_dims].reshape(N, inner_steps, shots, horizon, 1).transpose(0, 1)
    query = nodes[:, support_dims:].reshape(N, queries, horizon, 1)
    goals = torch.full((N, 1), 0.7, dtype=torch.float64)
    seeds = torch.zeros(N, shots + queries, dtype=torch.long)  # the line's start is fixed
    theta = list(algo.parameters())

    def objective():
        return algo.objective(algo.stacked(N), Line(horizon), goals, support, query, seeds[:, :shots], seeds[:, shots:],
                              create_graph=not algo.cfg.first_order)

    out = objective()
    estimate = torch.autograd.grad(((out.surrogate + out.credit * out.post) * weights).sum(), theta)
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype) for i, p in enumerate(theta)]
    h = 1e-5

    def J(sign: float) -> float:
        with torch.no_grad():
            for p, d in zip(theta, v):
                p.add_(sign * h * d)
        value = float((objective().post * weights).sum())
        with torch.no_grad():
            for p, d in zip(theta, v):
                p.sub_(sign * h * d)
        return value

    flat = torch.cat([g.flatten() for g in estimate])
    return flat, float(flat @ torch.cat([d.flatten() for d in v])), (J(1) - J(-1)) / (2 * h)


@pytest.mark.parametrize("horizon,shots,queries,inner_steps,baseline,n,tol", [
    (1, 1, 1, 1, "none", 20, 3e-4),   # 2-d quadrature
    (1, 2, 2, 1, "loo", 12, 1e-3),    # leave-one-out baselines inside and outside (4-d)
    (2, 1, 1, 1, "none", 20, 1e-3),   # two steps per episode: returns-to-go (4-d)
    (1, 1, 1, 2, "none", 20, 1e-3),   # two inner steps, the second's episodes from the adapted policy (3-d)
])
def test_the_exact_meta_gradient_matches_finite_differences(horizon, shots, queries, inner_steps, baseline, n, tol):
    """pre_update_credit=true: the estimator's expectation is the gradient of the expected post-update return."""
    _, estimate, fd = meta_gradient_and_finite_difference(horizon, shots, queries, inner_steps, baseline, n,
                                                          pre_update_credit=True)
    assert abs(estimate - fd) < tol * abs(fd), (estimate, fd)


@pytest.mark.parametrize("case,cfg", [
    ((1, 1, 1, 1, "none", 20), {"pre_update_credit": False}),  # measured 37% off
    ((1, 1, 1, 1, "none", 20), {"first_order": True}),  # 62%
    ((1, 2, 2, 1, "loo", 12), {"baseline": "linear"}),  # 47%
])
def test_the_other_estimators_miss_it(case, cfg):
    """The paper's estimator (without the pre-update term), the first-order one, and outer baselines fitted on
    the very episodes they score (the paper's; biased with 2 episodes a task) are each well off the exact one."""
    args = dict(zip(["horizon", "shots", "queries", "inner_steps", "baseline", "n"], case))
    exact = meta_gradient_and_finite_difference(**args, pre_update_credit=True)[0]
    other = meta_gradient_and_finite_difference(**{**args, "pre_update_credit": True, **cfg})[0]
    assert (other - exact).norm() > 0.2 * exact.norm(), ((other - exact).norm(), exact.norm())


def test_a_batch_of_tasks_is_its_tasks_one_at_a_time():
    """The stacked (one pass for all tasks) meta-gradient is the mean of the per-task ones; metrics per task."""
    torch.manual_seed(0)
    algo = maml_rl.build(maml_rl.Config(), mlp.build(mlp.Config(hidden=[8]), (2,)), NAV).double()
    batch = sampler(batch=3, shots=4, queries=3, horizon=20).sample()
    batch = EnvTasks(batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y, batch.classes,
                     env=batch.env)
    metrics = algo.meta_step(batch)
    whole = [p.grad.clone() for p in algo.parameters()]
    assert set(metrics) == {"loss", "return_pre", "return_post"} and metrics["return_post"].shape == (3,)
    parts = []
    for t in range(3):
        algo.zero_grad()
        parts.append(algo.meta_step(batch[t:t + 1]))
        for acc, p in zip(whole, algo.parameters()):
            acc -= p.grad / 3
    assert max(float(g.abs().max()) for g in whole) < 1e-12
    torch.testing.assert_close(metrics["return_post"], torch.cat([m["return_post"] for m in parts]))


@pytest.mark.parametrize("outer", ["optimizer", "trpo", "ppo"])
def test_training_logs_the_return_after_each_inner_step(outer):
    """With two inner steps a training batch reports return_step0..2 (its episodes before, between and after the
    steps) beside return_pre (step 0's) and return_post (step 2's); evaluation's step 0 is the same episodes'."""
    torch.manual_seed(0)
    algo = maml_rl.build(maml_rl.Config(inner_steps=2, test_inner_steps=2, outer=outer),
                         mlp.build(mlp.Config(hidden=[8]), (2,)), NAV)
    batch = sampler(batch=3, shots=4, queries=3, horizon=12).sample()
    metrics = algo.meta_step(batch)
    assert {"return_step0", "return_step1", "return_step2", "return_pre", "return_post"} <= set(metrics)
    assert torch.equal(metrics["return_pre"], metrics["return_step0"])
    assert torch.equal(metrics["return_post"], metrics["return_step2"])
    algo.zero_grad()
    assert torch.equal(algo.evaluate(batch)["return_step0"], metrics["return_step0"])


def test_evaluation_reports_the_return_after_each_step():
    torch.manual_seed(0)
    algo = maml_rl.build(maml_rl.Config(test_inner_steps=2), mlp.build(mlp.Config(hidden=[8]), (2,)), NAV)
    batch = sampler(batch=4, shots=5, queries=5, horizon=10).sample()
    before = [p.detach().clone() for p in algo.parameters()]
    out = algo.evaluate(batch)
    assert list(out) == ["return_step0", "return_step1", "return_step2", "return"]
    assert torch.equal(out["return"], out["return_step2"]) and out["return"].shape == (4,)
    assert all(torch.equal(a, p) for a, p in zip(before, algo.parameters()))  # the meta-parameters are untouched
    assert all(p.grad is None for p in algo.parameters())
    # Step 0 is the unadapted policy on the support episodes' first noise block.
    noise = episode_noise(batch.support_y, 2, 10, 2, torch.float32, torch.device("cpu"))[0]
    episodes = rollout(algo.policy, algo.stacked(4, detach=True), batch.env, batch.params, noise, batch.support_y)
    torch.testing.assert_close(out["return_step0"], episodes.returns())
    assert algo.primary_metric == "return" and algo.higher_is_better


# ---------------------------------------------------------------- learning


def navigation_config(steps: int, **algo):
    return to_run_config({
        "algo": {"name": "maml_rl", **algo}, "data": {"name": "navigation2d"},
        "backbone": {"name": "mlp", "hidden": [32, 32]}, "device": {"type": "cpu"},
        "ways": 1, "shots": 10, "queries": 10, "meta_batch_size": 10, "steps": steps,
        "eval": {"ways": 1, "shots": 20, "queries": 20, "batch_size": 40}, "optim": {"name": "adam", "lr": 5e-3},
    })


def test_meta_training_learns_to_adapt_to_2d_navigation():
    """80 meta-steps (10 tasks x 10 episodes, a 32-32 policy; about 6 s on an idle core). On 40 held-out
    goals: the return after one adaptation step is well above the pre-update return (paired over tasks)
    and far above a randomly initialised policy's. Measured: random policy -101 before / -98 after one
    step; after training -40 / -26 (seed 0; 4.6 s of training)."""
    cfg = navigation_config(80)
    cpu = torch.device("cpu")
    engine.seed_everything(0)
    stores = engine.load_data(cfg, cpu)
    model = engine.build_algorithm(cfg, stores["train"])
    optimizer, _ = engine.build_optimizer(cfg, model.parameters())

    def test_returns() -> dict[str, torch.Tensor]:
        return model.evaluate(stores["test"].sampler(1, 20, 20, 40, 1).sample())

    random_policy = test_returns()
    sampler_ = stores["train"].sampler(1, 10, 10, 10, 0, training=True)
    for step in range(cfg.steps):
        optimizer.zero_grad()
        model.meta_step(sampler_.sample())
        optimizer.step()
    trained = test_returns()
    gain = trained["return_step1"] - trained["return_step0"]
    ci95 = 1.96 * float(gain.std()) / math.sqrt(len(gain))
    assert float(gain.mean()) > max(3.0, 2 * ci95), (float(gain.mean()), ci95)
    assert float(trained["return_step1"].mean()) > float(random_policy["return_step1"].mean()) + 30, \
        (trained, random_policy)


# ---------------------------------------------------------------- through the CLI

TINY_RL = ["algo=maml_rl", "data=navigation2d", "data.horizon=20", "backbone.hidden=[16,16]", "shots=4", "queries=4",
           "meta_batch_size=4", "steps=6", "trainer.log_every=2", "trainer.val_every=2", "trainer.val_episodes=4",
           "trainer.test_episodes=8", "trainer.ckpt_every=2", "trainer.progress=false", "algo.test_inner_steps=2"]


def test_train_kill_resume_bit_for_bit_and_eval_through_the_cli(tmp_path):
    """``metalearn train`` killed (SIGKILL) inside meta-step 5 and resumed ends bit for bit where an
    uninterrupted run ends; ``metalearn eval`` reports the return after 0, 1 and 2 steps."""
    whole, run = tmp_path / "whole", tmp_path / "run"
    with ThreadPoolExecutor(2) as pool:
        uninterrupted = pool.submit(run_cli, ["train", *TINY_RL, f"hydra.run.dir={whole}"], tmp_path)
        killed = run_cli(["train", *TINY_RL, f"hydra.run.dir={run}"], tmp_path,
                         env=cli_env(METALEARN_FAULT="kill_at=step:5"))
        proc = uninterrupted.result()
    assert proc.returncode == 0, describe(proc)
    assert killed.returncode == -9 and not (run / "results.json").exists(), describe(killed)
    assert "reinforcement, shots=4 queries=4 (episodes)" in proc.stdout
    resumed = run_cli(["train", f"resume={run}"], tmp_path)
    assert resumed.returncode == 0, describe(resumed)
    a, b = (torch.load(r / "checkpoints" / "last.pt", weights_only=True) for r in (whole, run))
    assert a["step"] == b["step"] == 6 and a["best"] == b["best"] and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "meta-parameters differ"
    assert all(torch.equal(x[n], y[n]) for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())
               for n in x)
    results = [json.loads((r / "results.json").read_text()) for r in (whole, run)]
    assert results[0]["test"] == results[1]["test"]
    assert list(results[0]["test"]) == ["return_step0", "return_step1", "return_step2", "return"]
    assert results[0]["best_val"]["metric"] == "return" and results[0]["episode"]["task"] == "reinforcement"
    assert results[0]["test"]["return"]["episodes"] == 8
    proc = run_cli(["eval", f"run={run}", "episodes=6"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "return_step2:" in proc.stdout and "(95% CI, 6 episodes)" in proc.stdout
    # Another number of adaptation steps from the same checkpoint: one more step, its own results file.
    more = run_cli(["eval", f"run={run}", "episodes=6", "adaptation_steps=3"], tmp_path)
    assert more.returncode == 0, describe(more)
    files = {p.name: json.loads(p.read_text()) for p in run.glob("eval-*.json")}
    assert len(files) == 2 and any("-steps3" in name for name in files), sorted(files)
    three = next(r for name, r in files.items() if "-steps3" in name)["test"]
    two = next(r for name, r in files.items() if "-steps3" not in name)["test"]
    assert list(three) == ["return_step0", "return_step1", "return_step2", "return_step3", "return"]
    # Steps before the last run the support episodes, the last the query episodes: steps 0 and 1 are the same runs.
    assert all(three[f"return_step{k}"] == two[f"return_step{k}"] for k in range(2))
    bad = run_cli(["eval", f"run={run}", "adaptation_steps=-1"], tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "metalearn: error: adaptation_steps=-1 must be a whole number >= 0 (the gradient steps on each task)"], describe(bad)


def test_task_kinds_are_checked_in_one_line(tmp_path):
    runs = {name: run_cli(["train", *args, "steps=1"], tmp_path) for name, args in {
        "maml": ["algo=maml", "data=navigation2d"],
        "sinusoid": ["algo=maml_rl", "data=sinusoid"],
    }.items()}
    for name, message in [("maml", "algo=maml learns classification and regression tasks only, and data=navigation2d "
                                   "is reinforcement; use one of: maml_rl, rl2, promp"),
                          ("sinusoid", "algo=maml_rl learns reinforcement tasks only, and data=sinusoid is regression; "
                                       "use one of: maml, reptile, metasgd")]:
        proc = runs[name]
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"metalearn: error: {message}"], describe(proc)
