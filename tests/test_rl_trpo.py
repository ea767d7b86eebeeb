"""MAML for RL's outer steps (algo.outer): the paper's TRPO (metalearn/algorithms/trpo.py: conjugate gradient,
Hessian-vector products of the KL through the inner update, the trust-region scale, the line search) and the
PPO-style clipped objective with several optimizer steps per batch (and the epoch cache all PPO-style algorithms
share); the run-config refusals; learning and kill -9 / resume through the CLI."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import describe, kill_and_resume, run_cli
from metalearn import distributed, engine
from metalearn.algorithms import maml_rl, trpo
from metalearn.algorithms.base import EpochCache, ProblemInfo
from metalearn.algorithms.policy_gradient import clipped_surrogate, log_prob, mean_kl
from metalearn.config import to_run_config
from metalearn.data import navigation2d
from metalearn.data.environments import EnvTasks
from metalearn.errors import ConfigError
from metalearn.models import mlp

NAV = ProblemInfo(input_shape=(2,), ways=1, num_train_classes=0, task="reinforcement", output_size=2)


def policy(hidden=(4,), double=True, **cfg) -> maml_rl.MAMLRL:
    torch.manual_seed(0)
    algo = maml_rl.build(maml_rl.Config(**cfg), mlp.build(mlp.Config(hidden=list(hidden)), (2,)), NAV)
    return algo.double() if double else algo


def tasks(batch=3, shots=4, queries=3, horizon=10, seed=0, double=True) -> EnvTasks:
    source = navigation2d.load(navigation2d.Config(horizon=horizon))["train"]
    b = source.sampler(1, shots, queries, batch, seed).sample()
    if not double:
        return b
    return EnvTasks(b.support_x.double(), b.support_y, b.query_x.double(), b.query_y, b.classes, env=b.env)


# ---------------------------------------------------------------- the pure functions


def test_conjugate_gradient_solves_a_small_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x = trpo.conjugate_gradient(lambda v: A @ v, b, iters=6)  # exact in n iterations (up to rounding)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    few = trpo.conjugate_gradient(lambda v: A @ v, b, iters=2)  # fewer: on the way, the residual smaller than b's
    assert (A @ few - b).norm() < b.norm()


def test_line_search_takes_the_first_acceptable_fraction_or_no_step():
    full = torch.tensor([1.0, -2.0], dtype=torch.float64)
    tried = []

    def improves_below_six_tenths(step):  # the surrogate rises only for steps under 0.6 of the full one
        tried.append(float(step[0]))
        return (1.0 if step[0] < 0.6 else -1.0), 0.001

    out = trpo.line_search(improves_below_six_tenths, full, 0.0, max_kl=0.01, ratio=0.8, max_backtracks=15)
    assert tried == pytest.approx([1.0, 0.8, 0.64, 0.512]) and out.accepted and out.tries == 4
    torch.testing.assert_close(out.step, full * 0.8 ** 3)
    assert out.improvement == 1.0 and out.kl == 0.001
    for evaluate in (lambda s: (1.0, 0.02),  # always outside the trust region
                     lambda s: (0.0, 0.0),  # never better
                     lambda s: (math.nan, math.nan)):
        out = trpo.line_search(evaluate, full, 0.0, max_kl=0.01, ratio=0.8, max_backtracks=15)
        assert not out.accepted and out.tries == 15 and torch.equal(out.step, torch.zeros(2, dtype=torch.float64))


# ---------------------------------------------------------------- TRPO on the meta-objective


def explicit(algo: maml_rl.MAMLRL, batch: EnvTasks):
    """(theta_old flat, the samples, KL(theta) and L(theta) as functions of a flat theta, re-adapted from the
    same support episodes through the inner update): what the explicit Hessian and gradient are taken of."""
    like = list(algo.weights().values())
    names = list(algo.weights())
    samples = algo.sample(batch)
    old = {k: v.detach() for k, v in samples.adapted.items()}

    def adapted(vec):
        vec = vec if vec.requires_grad else vec.clone().requires_grad_()  # the inner step differentiates w.r.t. it
        w = dict(zip(names, trpo.unflat(vec, like)))
        return algo.adapt(algo.stacked(batch.num_tasks, weights=w), samples.supports,
                          create_graph=not algo.cfg.first_order)

    def kl(vec):
        return mean_kl(algo.policy, old, adapted(vec), samples.query).mean()

    def surrogate(vec):
        return algo.ratio_surrogate(log_prob(algo.policy, adapted(vec), samples.query), samples)

    return trpo.flat(like).detach(), samples, kl, surrogate


@pytest.mark.parametrize("first_order,inner_steps", [(False, 1), (True, 1), (False, 2)])
def test_the_fisher_vector_product_is_the_explicit_hessian_of_the_kl(first_order, inner_steps):
    """The KL's Hessian-vector product at theta_old (through the inner updates, which are second order unless
    first_order) equals the Hessian of the KL as a function of theta, built entry by entry (float64). With two
    inner steps, re-adapting theta_old from the cached support episodes (``adapt``) reaches ``sample``'s theta_old'
    exactly (the KL is 0 there)."""
    algo = policy(first_order=first_order, inner_steps=inner_steps)
    batch = tasks()
    theta, samples, kl, _ = explicit(algo, batch)
    assert len(samples.supports) == inner_steps and float(kl(theta).detach()) == 0
    H = torch.autograd.functional.hessian(kl, theta)
    assert H.shape == (theta.numel(),) * 2 and float(H.abs().max()) > 1e-3
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)
    assert float(torch.linalg.eigvalsh(H).min()) > -1e-10  # a Fisher matrix: positive semi-definite
    params = list(algo.weights().values())
    old = {k: v.detach() for k, v in samples.adapted.items()}
    grad = torch.autograd.grad(mean_kl(algo.policy, old, samples.adapted, samples.query).mean(), params,
                               create_graph=True)
    product = trpo.hessian_vector_product(grad, params, damping=0.25)
    for seed in range(3):
        v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        torch.testing.assert_close(product(v), H @ v + 0.25 * v, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_a_trpo_meta_step_is_the_scaled_natural_gradient_within_the_trust_region(inner_steps):
    """One meta_step with outer=trpo sets .grad to minus a step s that SGD (lr 1) adds: s is a backtracked
    fraction of F^-1 g scaled to 0.5 s'Fs = max_kl (F, g explicit); the KL measured after the step is within
    max_kl and the surrogate rose; the metrics report both. Also through two inner steps (``adapt``'s loop)."""
    algo = policy(outer="trpo", max_kl=0.005, cg_iters=60, cg_damping=1e-2,  # CG to convergence: s = F^-1 g
                  inner_steps=inner_steps)
    batch = tasks()
    theta, samples, kl, surrogate = explicit(algo, batch)
    F = torch.autograd.functional.hessian(kl, theta) + algo.cfg.cg_damping * torch.eye(theta.numel(), dtype=theta.dtype)
    g = torch.autograd.functional.jacobian(surrogate, theta)
    natural = torch.linalg.solve(F, g)
    full = natural * math.sqrt(2 * 0.005 / float(natural @ F @ natural))

    optimizer = torch.optim.SGD(algo.parameters(), lr=1.0, momentum=0.0)
    optimizer.zero_grad()
    metrics = algo.meta_step(batch)
    optimizer.step()
    step = trpo.flat(list(algo.weights().values())).detach() - theta
    tries = int(metrics["line_search_tries"])
    assert float(metrics["step_accepted"]) == 1.0
    expected = full * 0.8 ** (tries - 1)
    assert float((step - expected).norm() / expected.norm()) < 2e-3  # CG stops at rllab's residual 1e-10
    torch.testing.assert_close(trpo.flat([p.grad for p in algo.weights().values()]), -step, rtol=0, atol=1e-15)
    measured_kl, measured_surrogate = float(kl(theta + step).detach()), float(surrogate(theta + step).detach())
    before = float(surrogate(theta).detach())
    assert 0 < measured_kl <= 0.005 and math.isclose(float(metrics["kl"].mean()), measured_kl, rel_tol=1e-9)
    assert measured_surrogate > before + 1e-4
    assert math.isclose(float(metrics["surrogate_gain"]), measured_surrogate - before, rel_tol=1e-9)
    steps = {f"return_step{k}" for k in range(inner_steps + 1)} if inner_steps > 1 else set()
    assert set(metrics) == {"loss", "return_pre", "return_post", "kl", "line_search_tries", "step_accepted",
                            "surrogate_gain", *steps} and metrics["kl"].shape == (3,)


def test_a_trpo_meta_step_in_float32_keeps_the_kl_and_raises_the_surrogate():
    """The training path (float32, 10 CG iterations, a 16-unit policy, 4 tasks x 5 episodes)."""
    algo = policy(hidden=(16, 16), double=False, outer="trpo")
    batch = tasks(batch=4, shots=5, queries=5, horizon=20, double=False)
    theta, _, kl, surrogate = explicit(algo, batch)
    before = float(surrogate(theta).detach())
    optimizer = torch.optim.SGD(algo.parameters(), lr=1.0, momentum=0.0)
    optimizer.zero_grad()
    metrics = algo.meta_step(batch)
    optimizer.step()
    after = trpo.flat(list(algo.weights().values())).detach()
    assert float(metrics["step_accepted"]) == 1.0 and not torch.equal(after, theta)
    assert float(kl(after).detach()) <= 0.01 and float(surrogate(after).detach()) > before


# ---------------------------------------------------------------- the PPO-style outer objective


def test_ppo_epochs_reuse_the_batchs_rollouts_and_clip_the_ratio():
    """outer=ppo: updates_per_batch = ppo_epochs; every call on the same batch object reuses its first call's
    rollouts (re-adapting theta from the cached support episodes), its gradient that of minus the clipped
    surrogate; the metrics are the first call's; a new batch object (or the same after ppo_epochs calls) is
    sampled afresh."""
    algo = policy(outer="ppo", ppo_epochs=3, clip=0.2)
    assert algo.updates_per_batch == 3 and policy().updates_per_batch == 1
    batch = tasks()
    reference = explicit(algo, batch)[1]  # what the first call samples (theta_old)
    optimizer = torch.optim.SGD(algo.parameters(), lr=0.5, momentum=0.0)
    first = None
    for epoch in range(3):
        params = algo.adapt(algo.stacked(3), reference.supports, create_graph=True)
        logp = log_prob(algo.policy, params, reference.query)
        objective = clipped_surrogate(logp, reference.logp_old, reference.adv, reference.query.mask, 0.2).mean()
        if epoch == 2:  # the policy has moved far enough for the clip to matter
            assert float((logp.detach() - reference.logp_old).exp().sub(1).abs().max()) > 0.2
        expected = torch.autograd.grad(-objective, list(algo.weights().values()))
        optimizer.zero_grad()
        metrics = algo.meta_step(batch)
        for p, e in zip(algo.weights().values(), expected):
            torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)
        first = metrics if first is None else first
        assert metrics is first  # the first call's metrics
        optimizer.step()
    # A new batch object (the same tasks) is sampled with the current theta; so is the same one after ppo_epochs.
    for later in (tasks(), batch):
        again = algo.meta_step(later)
        assert again is not first and not torch.equal(again["return_post"], first["return_post"])


def test_the_epoch_cache_keeps_a_batchs_value_for_its_updates_then_makes_a_new_one():
    """base.EpochCache, which maml_rl's outer=ppo, ProMP and RL^2 share: keyed on the batch object, dropped after
    ``updates`` calls (so a further call on the same object makes a new value), and empty after a failed make."""
    cache, made = EpochCache(), []

    def make(tag):
        def run():
            made.append(tag)
            return f"{tag}{len(made)}"
        return run

    batch, other = object(), object()
    assert [cache.get(batch, 3, make("a")) for _ in range(4)] == [("a1", 0), ("a1", 1), ("a1", 2), ("a2", 0)]
    assert cache.get(other, 3, make("b")) == ("b3", 0)  # another batch object: made afresh, whatever came before
    assert cache.get(other, 3, make("b")) == ("b3", 1)
    assert cache.get(batch, 1, make("c")) == ("c4", 0) and cache.get(batch, 1, make("c")) == ("c5", 0)

    def fails():
        raise RuntimeError("the simulator failed")

    with pytest.raises(RuntimeError):
        cache.get(other, 3, fails)
    assert cache.get(other, 3, make("d")) == ("d6", 0)  # nothing stale kept from before the failure


# ---------------------------------------------------------------- the run config


def run_config(**optim):
    return to_run_config({"algo": {"name": "maml_rl", "outer": "trpo"}, "data": {"name": "navigation2d"},
                          "backbone": {"name": "mlp"}, "ways": 1, "optim": optim})


def test_outer_trpo_checks_the_optimizer_and_one_process(monkeypatch):
    algo = policy(double=False, outer="trpo")
    algo.check_training(run_config(name="sgd", lr=1.0, momentum=0.0))  # accepted
    for optim, line in [({"name": "sgd", "lr": 1.0, "momentum": 0.0, "grad_clip": 1.0, "lr_multipliers": {"net": 2.0}},
                         "set optim.grad_clip=null optim.lr_multipliers=null (got optim.grad_clip=1, "
                         "optim.lr_multipliers={'net': 2.0})"),
                        ({"name": "sgd", "lr": 1.0, "momentum": 0.0, "scheduler": "cosine"},
                         "set optim.scheduler=constant (got optim.scheduler=cosine)")]:
        with pytest.raises(ConfigError) as e:
            algo.check_training(run_config(**optim))
        assert str(e.value) == ("algo.outer=trpo makes the outer step itself and hands it to the optimizer as a "
                                f"gradient, which plain SGD with step 1 applies unchanged: {line}")
    policy(double=False).check_training(run_config())  # outer=optimizer: any optimizer
    with pytest.raises(ConfigError, match="algo.outer='adam' is not one of: optimizer, trpo, ppo"):
        policy(outer="adam")
    with pytest.raises(ConfigError, match="algo.pre_update_credit=true is for algo.outer=optimizer"):
        policy(outer="ppo", pre_update_credit=True)
    for cfg in ({"clip": 1.5}, {"clip": 0.0}, {"ppo_epochs": 0}):  # checked whatever the outer (shared with promp, rl2)
        with pytest.raises(ConfigError, match=r"^algo.ppo_epochs must be >= 1 and algo.clip in \(0, 1\) \(got "):
            policy(**cfg)
    # Several processes (torchrun): refused when training (check_training), never when building (metalearn eval).
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    credit = policy(double=False, pre_update_credit=True)
    with pytest.raises(ConfigError, match=r"^algo.pre_update_credit=true needs the whole meta-batch in one process"):
        credit.check_training(run_config())
    with pytest.raises(ConfigError, match="algo.outer=trpo's line search needs the whole meta-batch in one process"):
        algo.check_training(run_config(name="sgd", lr=1.0, momentum=0.0))
    policy(double=False, outer="ppo").check_training(run_config())  # per-task: the ranks' mean is the batch's


def test_outer_trpo_refuses_other_optimizers_in_one_line_through_the_cli(tmp_path):
    """The one CLI process of the meta-RL refusals (test_rl_trpo, test_rl_promp, test_rl2): the others are
    checked in process; this one checks that check_training's line reaches the console alone."""
    proc = run_cli(["train", "algo=maml_rl", "data=navigation2d", "algo.outer=trpo", "steps=1",
                    f"hydra.run.dir={tmp_path}/r"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "metalearn: error: algo.outer=trpo makes the outer step itself and hands it to the optimizer as a gradient, "
        "which plain SGD with step 1 applies unchanged: set optim.name=sgd optim.lr=1 optim.momentum=0 (got "
        "optim.name=adam, optim.lr=0.001, optim.momentum=0.9)"], describe(proc)


# ---------------------------------------------------------------- learning and resuming through the CLI

SMALL_TRPO = ["experiment=maml_trpo_navigation2d", "data.horizon=30", "backbone.hidden=[32,32]", "shots=8", "queries=8",
              "meta_batch_size=8", "steps=12", "algo.test_inner_steps=1", "eval.shots=20", "eval.queries=20",
              "trainer.log_every=4", "trainer.val_every=12", "trainer.val_episodes=8", "trainer.test_episodes=40",
              "trainer.ckpt_every=12", "trainer.progress=false"]


def test_outer_trpo_learns_to_adapt_to_2d_navigation_through_the_cli(tmp_path):
    """The preset, shrunk (horizon 30, 8 tasks x 8 episodes, a 32-32 policy, 12 TRPO steps; about 3 s of training
    on an idle core): on 40 held-out goals the return after one adaptation step is well above the pre-update one
    (paired over goals) and above a randomly initialised policy's. Measured (seeds 0-2, in process): random
    -17.5 / -17.5, after training -12 before and -7 after the step."""
    run = tmp_path / "run"
    proc = run_cli(["train", *SMALL_TRPO, f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    test = json.loads((run / "results.json").read_text())["test"]
    pre, post = test["return_step0"], test["return_step1"]
    assert post["mean"] > pre["mean"] + max(2.0, 2 * post["ci95"]), test
    cfg = to_run_config({"algo": {"name": "maml_rl"}, "data": {"name": "navigation2d", "horizon": 30},
                         "backbone": {"name": "mlp", "hidden": [32, 32]}, "ways": 1, "device": {"type": "cpu"}})
    engine.seed_everything(0)
    stores = engine.load_data(cfg, torch.device("cpu"))
    untrained = engine.build_algorithm(cfg, stores["train"])
    random_policy = untrained.evaluate(stores["test"].sampler(1, 20, 20, 40, 1).sample())
    assert post["mean"] > float(random_policy["return"].mean()) + 6, (test, random_policy)
    # Logged every 4 steps: the KL after the step (within max_kl) and the line search's outcome.
    logged = re.findall(r"step (\d+)/12 .* kl ([\d.]+) line_search_tries ([\d.]+) step_accepted ([\d.]+)",
                        proc.stdout + proc.stderr)
    assert [int(step) for step, *_ in logged] == [4, 8, 12], describe(proc)
    assert all(0 < float(kl) <= 0.01 and 1 <= float(tries) <= 15 for _, kl, tries, _ in logged), logged


TINY_PPO = ["algo=maml_rl", "algo.outer=ppo", "algo.ppo_epochs=2", "data=navigation2d", "data.horizon=20",
            "backbone.hidden=[16,16]", "shots=4", "queries=4", "meta_batch_size=4", "steps=6", "trainer.log_every=2",
            "trainer.val_every=2", "trainer.val_episodes=4", "trainer.test_episodes=8", "trainer.ckpt_every=2",
            "trainer.progress=false"]


@pytest.mark.slow  # the same engine path (updates_per_batch > 1, killed at update 0) as the default tier's
# test_rl_promp.py::test_train_kill_resume_bit_for_bit_through_the_cli
def test_outer_ppo_steps_the_optimizer_per_epoch_and_resumes_bit_for_bit_after_kill_9(tmp_path):
    """A run with ppo_epochs=2 makes two Adam steps per batch (12 in 6 meta-steps); killed (SIGKILL) inside
    meta-step 5, between its rollouts and its first update, and resumed, it ends bit for bit as an uninterrupted
    run."""
    a, b, _, _ = kill_and_resume(TINY_PPO, tmp_path)
    assert a["step"] == b["step"] == 6
    assert {int(s["step"]) for s in a["optimizer"]["state"].values()} == {12}  # 2 Adam steps a batch


TINY_TRPO = [a for a in TINY_PPO if not a.startswith("algo.")] + [
    "algo.outer=trpo", "optim.name=sgd", "optim.lr=1", "optim.momentum=0"]


@pytest.mark.slow  # the line search keeps no state between meta-steps; the default tier resumes outer=optimizer
# (test_rl_navigation.py) and ProMP's epochs (test_rl_promp.py)
def test_outer_trpo_resumes_bit_for_bit_after_kill_9(tmp_path):
    a, b, _, _ = kill_and_resume(TINY_TRPO, tmp_path)
    assert a["step"] == b["step"] == 6
