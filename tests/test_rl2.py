"""RL^2 (algo=rl2, backbone=gru): the recurrent policy's sequence pass against its step-by-step rollout, the hidden
state across the episodes of a trial and between trials, PPO epochs on cached trials, the config checks, learning
and ``metalearn eval`` through the CLI, and (slow tier) kill -9 + resume bit for bit."""

from __future__ import annotations

import json
import math

import pytest
import torch

import metalearn
from conftest import describe, kill_and_resume, run_cli
from metalearn import distributed
from metalearn.algorithms import rl2
from metalearn.algorithms.base import ProblemInfo
from metalearn.algorithms.policy_gradient import LOG_2PI
from metalearn.config import to_run_config
from metalearn.data import navigation2d
from metalearn.data.environments import EnvTasks, episode_noise
from metalearn.errors import ConfigError
from metalearn.models import gru, mlp

NAV = ProblemInfo(input_shape=(2,), ways=1, num_train_classes=0, task="reinforcement", output_size=2)


def policy(hidden=8, layers=1, dtype=torch.float64, **cfg) -> rl2.RL2:
    torch.manual_seed(0)
    return rl2.build(rl2.Config(**cfg), gru.build(gru.Config(hidden=hidden, layers=layers), (2,)), NAV).to(dtype)


def tasks(shots=2, queries=3, batch=4, seed=0, **data) -> EnvTasks:
    return navigation2d.load(navigation2d.Config(**data))["train"].sampler(1, shots, queries, batch, seed).sample()


def trial_noise(batch: EnvTasks, dtype=torch.float64) -> torch.Tensor:
    return episode_noise(batch.query_y, batch.shots, batch.env.horizon, 2, dtype, torch.device("cpu"))


# ---------------------------------------------------------------- the recurrent policy


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_the_sequence_pass_gives_the_rollouts_own_log_probabilities(dtype, tol):
    """One nn.GRU pass over each stored trial recovers, at every step the rollout took, the very noise the rollout
    drew its action with: the same network, the same hidden states. Goals near the origin and a wide tolerance
    end many episodes early, so the ended steps are moved out of the way (two layers, three episodes a trial)."""
    algo = policy(hidden=6, layers=2, dtype=dtype)
    batch = tasks(shots=3, queries=2, batch=5, horizon=8, goal_low=-0.15, goal_high=0.15, goal_tolerance=0.1)
    noise = trial_noise(batch, dtype)
    trials = algo.run_trials(batch.env, batch.params.to(dtype), noise, batch.query_y)
    steps = trials.steps
    B, Q, T = steps.mask.shape
    assert (B, Q, T) == (5, 2, 24) and 0.3 < float(steps.mask.mean()) < 0.9  # many episodes ended early
    # Stored steps: every trial's running steps first, in their order, then the ended ones.
    assert torch.equal(steps.mask, steps.mask.sort(dim=-1, descending=True, stable=True).values)
    index = trials.index.masked_fill(steps.mask == 0, 10 ** 6)
    assert torch.equal(index, index.sort(-1).values)
    drawn = noise.permute(1, 2, 0, 3, 4).reshape(B, Q, T, 2).gather(2, trials.index[..., None].expand(B, Q, T, 2))
    expected = -0.5 * (drawn ** 2).sum(-1) - algo.log_std.detach().sum() - LOG_2PI
    with torch.no_grad():
        logp = algo.log_prob(steps)
    alive = steps.mask.bool()
    assert float((logp - expected)[alive].abs().max()) < tol * float(expected[alive].abs().max())
    # The episodes' returns are the stored rewards, episode by episode.
    per_episode = torch.zeros(B, Q, 3, dtype=dtype).scatter_add_(2, trials.index // 8, steps.rewards)
    torch.testing.assert_close(per_episode, trials.episode_returns)


def test_the_hidden_state_carries_across_a_trials_episodes_and_resets_between_trials():
    algo = policy()
    batch = tasks(shots=2, queries=3, batch=3, horizon=6, goal_tolerance=0.0)  # no early ends: episode k at 6k..6k+5
    seeds = batch.query_y.clone()
    seeds[:, 1] = seeds[:, 0]  # trials 0 and 1 of each task: the same episodes
    noise = episode_noise(seeds, 2, 6, 2, torch.float64, torch.device("cpu"))
    trials = algo.run_trials(batch.env, batch.params, noise, seeds)
    x = trials.steps.obs  # the GRU's inputs: observation, previous action, previous reward, done flag
    # A trial starts from nothing; episode 1 starts from the origin again, told what ended episode 0.
    assert x[:, :, 0].abs().max() == 0
    torch.testing.assert_close(x[:, :, 6, :2], torch.zeros(3, 3, 2, dtype=torch.float64))
    torch.testing.assert_close(x[:, :, 6, 2:4], trials.steps.actions[:, :, 5])
    torch.testing.assert_close(x[:, :, 6, 4], trials.steps.rewards[:, :, 5])
    assert x[:, :, 6, 5].eq(1).all() and x[:, :, 1:6, 5].eq(0).all() and x[:, :, 7:, 5].eq(0).all()
    # Episode 1 acts on what the hidden state kept from episode 0: from a fresh state its actions are not as likely.
    with torch.no_grad():
        whole = algo.log_prob(trials.steps)
        alone = algo.log_prob(type(trials.steps)(*(v[:, :, 6:] for v in (x, trials.steps.actions, trials.steps.rewards,
                                                                         trials.steps.mask))))
    assert (whole[:, :, 6:] - alone).abs().min() > 1e-6
    # Between trials it resets: the same seeds give the same trial, whatever else is in the batch or came before.
    assert torch.equal(trials.steps.actions[:, 0], trials.steps.actions[:, 1])
    assert not torch.equal(trials.steps.actions[:, 0], trials.steps.actions[:, 2])
    one = algo.run_trials(batch.env, batch.params[1:2], noise[:, 1:2, 2:], seeds[1:2, 2:])
    torch.testing.assert_close(one.steps.actions[0, 0], trials.steps.actions[1, 2], rtol=1e-12, atol=1e-12)
    first, again = algo.evaluate(batch), algo.evaluate(batch)
    assert list(first) == ["return_step0", "return_step1", "return"] and first["return"].shape == (3,)
    assert all(torch.equal(first[k], again[k]) for k in first) and torch.equal(first["return"], first["return_step1"])


class CountingSteps:
    """navigation2d, counting its env.step calls."""

    def __init__(self, env):
        self.env, self.steps = env, 0
        self.obs_size, self.action_size, self.horizon = env.obs_size, env.action_size, env.horizon

    def reset(self, params, seeds):
        return self.env.reset(params, seeds)

    def step(self, params, state, action):
        self.steps += 1
        return self.env.step(params, state, action)


def test_ppo_epochs_update_on_the_cached_trials():
    """ppo_epochs calls of meta_step on one batch object: the first runs the trials (2 episodes x 5 steps), the
    others reuse them under the updated weights; the first update is the plain policy gradient (ratio 1). After
    ppo_epochs calls the same batch object runs new trials (base.EpochCache), as does a new batch object."""
    algo = policy(ppo_epochs=3, dtype=torch.float32)
    assert algo.updates_per_batch == 3
    batch = tasks(shots=2, queries=2, batch=3, horizon=5)
    env = CountingSteps(batch.env)
    batch = EnvTasks(batch.support_x, batch.support_y, batch.query_x, batch.query_y, batch.classes, env=env)
    fresh = policy(ppo_epochs=3, dtype=torch.float32)  # the weights algo starts from: its first trials, by hand
    trials = fresh._trials(batch)
    env.steps = 0
    optimizer = torch.optim.Adam(algo.parameters(), 0.05)
    grads, metrics = [], []
    for _ in range(3):
        optimizer.zero_grad()
        metrics.append(algo.meta_step(batch))
        grads.append(torch.cat([p.grad.flatten() for p in algo.parameters()]))
        optimizer.step()
    assert env.steps == 2 * 5  # one rollout
    assert metrics[0] is metrics[1] is metrics[2] and set(metrics[0]) == {"return_step0", "return_step1", "return",
                                                                         "loss"}
    assert torch.equal(metrics[0]["return"], fresh._metrics(trials)["return"])  # the trials of the first call
    assert not torch.allclose(grads[0], grads[1])  # the same trials, other weights
    # Update 1's gradient: minus the mean over each task's steps of A grad log pi, averaged over tasks.
    logp = fresh.log_prob(trials.steps)
    adv, mask = fresh._advantages(trials.steps), trials.steps.mask
    (-((logp * adv * mask).sum((1, 2)) / mask.sum((1, 2))).mean()).backward()
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in fresh.parameters()]), grads[0])
    # The batch's ppo_epochs calls made: the same batch object again runs new trials, with the updated weights.
    again = algo.meta_step(batch)
    assert env.steps == 2 * 2 * 5 and again is not metrics[0]
    assert not torch.equal(again["return"], metrics[0]["return"])
    # A new batch object (the same tasks): new trials.
    algo.meta_step(EnvTasks(batch.support_x, batch.support_y, batch.query_x, batch.query_y, batch.classes, env=env))
    assert env.steps == 3 * 2 * 5


def test_config_checks_are_one_line(monkeypatch):
    """In process (test_rl_trpo.py has the one CLI process of these refusals)."""
    assert metalearn.compose(["algo=rl2", "data=navigation2d"]).backbone.name == "gru"  # the algorithm's choice wins
    assert metalearn.compose(["algo=maml_rl", "data=navigation2d"]).backbone.name == "mlp"
    with pytest.raises(ConfigError, match=r"^algo=rl2 needs a recurrent policy: backbone=gru \(not MLP\)$"):
        rl2.build(rl2.Config(), mlp.build(mlp.Config(), (2,)), NAV)
    for cfg, message in [({"ppo_epochs": 0}, "algo.ppo_epochs must be >= 1"), ({"baseline": "value"}, "algo.baseline"),
                         ({"gae_lambda": 2.0}, "algo.gae_lambda must be in"),
                         ({"clip": 2.0}, r"algo.clip in \(0, 1\)")]:
        with pytest.raises(ConfigError, match=message):
            policy(**cfg)
    with pytest.raises(ConfigError, match="backbone=gru reads sequences"):
        gru.build(gru.Config(), (2,))(torch.zeros(5, 2))  # never a batch of examples read as one sequence
    # Several processes (torchrun) each see a share of the batch: refused where the baseline or the normalisation
    # couples the tasks (when training; building, as metalearn eval does, is never refused).
    cfg = to_run_config({"algo": {"name": "rl2"}, "data": {"name": "navigation2d"}, "backbone": {"name": "gru"}})
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for keys, line in [({}, "fits its baseline over the whole batch of trials, which one process of a torchrun job "
                            "does not see; run it without torchrun, or set algo.baseline=none"),
                       ({"baseline": "none", "normalize_advantages": True},
                        "normalises its advantages over the whole batch of trials, which one process of a torchrun job "
                        "does not see; run it without torchrun, or set algo.normalize_advantages=false"),
                       ({"baseline": "loo", "normalize_advantages": True},
                        "fits its baseline and normalises its advantages over the whole batch of trials, which one "
                        "process of a torchrun job does not see; run it without torchrun, or set algo.baseline=none "
                        "algo.normalize_advantages=false")]:
        with pytest.raises(ConfigError) as e:
            policy(**keys).check_training(cfg)
        assert str(e.value) == f"algo=rl2 {line}"
    policy(baseline="none", normalize_advantages=False).check_training(cfg)
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    policy().check_training(cfg)


def test_the_gradient_is_the_batchs_mean_of_its_halves_without_baseline_or_normalisation():
    """What check_training's torchrun rule rests on: with baseline=none and normalize_advantages=false the
    gradient of a batch is the mean of its halves' (each half what one of two processes sees); with the linear
    baseline (fitted over all the batch's trials) it is not."""
    def gradient(algo, batch) -> torch.Tensor:
        algo.zero_grad()
        algo.meta_step(batch)
        return torch.cat([p.grad.flatten() for p in algo.parameters()])

    batch = tasks(shots=2, queries=2, batch=4, horizon=5)
    batch = EnvTasks(batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y, batch.classes,
                     env=batch.env)
    for cfg, same in [({"baseline": "none", "normalize_advantages": False}, True), ({}, False)]:
        algo = policy(ppo_epochs=1, **cfg)
        whole, halves = gradient(algo, batch), (gradient(algo, batch[:2]) + gradient(algo, batch[2:])) / 2
        error = float((whole - halves).norm() / whole.norm())
        assert (error < 1e-12) if same else (error > 0.05), (cfg, error)


# ---------------------------------------------------------------- through the CLI

LEARN = ["algo=rl2", "data=navigation2d", "data.horizon=20", "backbone.hidden=32", "shots=2", "queries=4",
         "meta_batch_size=10", "steps=40", "optim.lr=0.01", "algo.init_std=0.3", "algo.normalize_advantages=true",
         "trainer.val_every=40", "trainer.val_episodes=10", "trainer.test_episodes=40", "trainer.log_every=10",
         "trainer.ckpt_every=40", "trainer.progress=false"]


def test_a_short_run_learns_to_use_the_first_episode_and_evaluates_through_the_cli(tmp_path):
    """40 PPO batches (10 tasks x 4 trials of 2 episodes, 20 steps each, a 32-unit GRU, 10 epochs; about 12 s on an
    idle core). On 40 held-out goals the second episode of a trial is clearly better than the first, and both
    far better than the random initial policy (about -11 to -14). Measured with seed=0 / 1 / 2: episode 0 -5.6 /
    -6.1 / -6.3, episode 1 -4.1 / -4.3 / -4.8 (+- 0.4 to 0.5 each). ``metalearn eval`` of the run reports the
    return of each episode of a trial, also of longer trials than in training."""
    run = tmp_path / "run"
    proc = run_cli(["train", *LEARN, f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    results = json.loads((run / "results.json").read_text())
    test = results["test"]
    assert list(test) == ["return_step0", "return_step1", "return"] and test["return"]["episodes"] == 40
    assert results["best_val"]["metric"] == "return" and all(math.isfinite(m["mean"]) for m in test.values())
    first, last = test["return_step0"]["mean"], test["return"]["mean"]
    assert last - first > 0.5 and last > -6.0, test
    proc = run_cli(["eval", f"run={run}", "episodes=5"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "return_step1:" in proc.stdout and "(95% CI, 5 episodes)" in proc.stdout
    longer = run_cli(["eval", f"run={run}", "episodes=5", "shots=3"], tmp_path)
    assert longer.returncode == 0 and "return_step2:" in longer.stdout, describe(longer)


TINY = ["algo=rl2", "data=navigation2d", "data.horizon=10", "backbone.hidden=8", "shots=2", "queries=2",
        "meta_batch_size=3", "steps=6", "algo.ppo_epochs=3", "trainer.log_every=2", "trainer.val_every=2",
        "trainer.val_episodes=3", "trainer.test_episodes=4", "trainer.ckpt_every=2", "trainer.progress=false"]


@pytest.mark.slow  # the same engine path (updates_per_batch > 1, killed at update 0) as the default tier's
# test_rl_promp.py::test_train_kill_resume_bit_for_bit_through_the_cli
def test_train_kill_resume_bit_for_bit_through_the_cli(tmp_path):
    """Killed (SIGKILL) inside meta-step 5 (its first PPO epoch's gradient computed, not yet applied) and resumed:
    bit for bit the uninterrupted run's weights (the GRU's too), optimizer state and test results."""
    a, b, results, _ = kill_and_resume(TINY, tmp_path)
    assert a["step"] == b["step"] == 6 and a["best"] == b["best"]
    assert any(k.startswith("backbone.gru.") for k in a["model"])
    assert list(results[0]["test"]) == ["return_step0", "return_step1", "return"]
