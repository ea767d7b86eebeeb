"""LEO: the module against an independent re-computation (plain loops, closed-form inner gradients),
float64 finite differences of the meta-loss, evaluation, learning on pre-trained glyph features, the
CLI pipeline (baseline -> features -> leo -> eval) and the preset.

The reference below loops over tasks, classes, samples and support pairs, and writes the inner
gradients in closed form (softmax minus one-hot, chained through the decoder and the sampling
noise by hand), so it shares nothing with the module but the parameter names. Randomness: the
module draws, in order, the latent noise [T, N, K, L], then the weight noise [T, N, K, d] at each
latent step and once more after the last one; with dropout 0 that is all it draws, and the
reference draws the same tensors from the same seed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from metalearn.algorithms import ProblemInfo, algorithm_module
from metalearn.algorithms import leo as leo_mod
from metalearn.config import to_run_config
from metalearn.data import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models import identity
from plainops import params_of

WAYS, SHOTS, QUERIES, TASKS, DIM, LATENT = 3, 2, 2, 2, 6, 3
CFG = dict(latent_size=LATENT, inner_steps=2, finetune_steps=2, inner_lr=0.4, finetune_lr=0.3, dropout=0.0,
           kl_weight=0.1, encoder_penalty_weight=0.2, l2_penalty_weight=0.01, orthogonality_penalty_weight=0.05,
           init_scale=1.0)


# ---------------------------------------------------------------- helpers


def tiny(**cfg) -> leo_mod.LEO:
    torch.manual_seed(0)
    backbone = identity.build(identity.Config(), (DIM,))
    info = ProblemInfo(input_shape=(DIM,), ways=WAYS, num_train_classes=10)
    algo = leo_mod.build(leo_mod.Config(**{**CFG, **cfg}), backbone, info).double()
    with torch.no_grad():  # non-trivial rates, and Gaussians whose std is unclamped in places
        algo.log_inner_lr.add_(0.5 * torch.rand_like(algo.log_inner_lr))
        algo.log_finetune_lr.add_(0.5 * torch.rand_like(algo.log_finetune_lr))
        algo.relation[2].weight.mul_(2.0)
    return algo


def random_batch(seed=1, tasks=TASKS, ways=WAYS, shots=SHOTS, queries=QUERIES) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def labels(k):
        y = torch.arange(ways).repeat_interleave(k)
        return torch.stack([y[torch.randperm(len(y), generator=g)] for _ in range(tasks)])

    sy, qy = labels(shots), labels(queries)
    centres = torch.randn(tasks, ways, DIM, generator=g, dtype=torch.float64)

    def features(y):
        base = centres[torch.arange(tasks)[:, None], y]
        return (base + 0.7 * torch.randn(base.shape, generator=g, dtype=torch.float64)).relu()

    classes = torch.stack([torch.randperm(10, generator=g)[:ways] for _ in range(tasks)])
    return TaskBatch(features(sy), sy, features(qy), qy, classes)


def gaussian(params: torch.Tensor, offset: float, eps):
    """(sample, std, raw) of Gaussian parameters [2k]; eps None: the mean."""
    k = params.shape[-1] // 2
    mean, raw = params[..., :k], params[..., k:]
    if eps is None:
        return mean, None, raw
    std = torch.clamp(torch.exp(raw) - 1 + offset, min=1e-10)
    return mean + std * eps, std, raw


def leo_by_hand(p: dict, batch: TaskBatch, cfg: dict, noise: dict | None, targets: list | None = None):
    """(query logits [T, m, N], KL [T], encoder penalty [T], adapted codes) with loops and closed-form
    inner gradients. ``noise``: {"z": [T, N, K, L], "w": [steps + 1 tensors [T, N, K, d]]}, or None
    (evaluation: means). The encoder penalty pulls the initial codes towards the adapted ones held
    fixed (a stop-gradient): ``targets`` gives them (finite differences hold them at the unperturbed value)."""
    T, n, d = batch.support_x.shape
    N, K, L = batch.ways, n // batch.ways, cfg["latent_size"]
    W = [p[f"relation.{i}.weight"] for i in range(3)]
    D = p["decoder.weight"]  # [2d, L]
    offset_w = math.sqrt(2.0 / (N + d))
    all_logits, kls, penalties, adapted = [], [], [], []
    for t in range(T):
        xs, ys, xq = batch.support_x[t], batch.support_y[t], batch.query_x[t]
        codes = [p["encoder.weight"] @ xs[i] for i in range(n)]
        relation = []
        for i in range(n):
            total = 0
            for j in range(n):
                h = torch.cat([codes[i], codes[j]])
                h = torch.relu(W[0] @ h)
                h = torch.relu(W[1] @ h)
                total = total + W[2] @ h
            relation.append(total / n)
        z = torch.zeros(N, K, L, dtype=xs.dtype)
        z0, kl_terms = [], []
        for c in range(N):
            members = [relation[i] for i in range(n) if ys[i] == c]
            params = sum(members) / len(members)
            row = []
            for k in range(K):
                eps = None if noise is None else noise["z"][t, c, k]
                sample, std, _ = gaussian(params, 0.0, eps)
                row.append(sample)
                if noise is not None:  # log q(z) - log N(z; 0, I), elementwise
                    kl_terms.append(-0.5 * eps ** 2 - torch.log(std) + 0.5 * sample ** 2)
            z0.append(torch.stack(row))
        z = torch.stack(z0)  # [N, K, L]
        start = z

        def decode(z, step):
            w, dw_draw = [], []
            for c in range(N):
                wr, dr = [], []
                for k in range(K):
                    eps = None if noise is None else noise["w"][step][t, c, k]
                    sample, std, raw = gaussian(D @ z[c, k], offset_w, eps)
                    wr.append(sample)
                    # d sample / d raw: eps * exp(raw) where the std is not clamped
                    dr.append(torch.zeros(d, dtype=xs.dtype) if eps is None
                              else eps * torch.exp(raw) * (torch.exp(raw) - 1 + offset_w > 1e-10))
                w.append(torch.stack(wr))
                dw_draw.append(torch.stack(dr))
            return torch.stack(w), torch.stack(dw_draw)  # [N, K, d] each

        def grad_w(w):
            """d (sum of support cross-entropies) / d w[c, k] = sum_i (softmax_i[c] - onehot_i[c]) x_i / K."""
            logits = xs @ w.mean(1).T
            residual = torch.softmax(logits, 1) - F.one_hot(ys, N).to(xs.dtype)  # [n, N]
            return (residual.T @ xs / K).unsqueeze(1).expand(N, K, d)

        for step in range(cfg["inner_steps"]):
            w, dw_draw = decode(z, step)
            gw = grad_w(w)
            gz = torch.einsum("ckd,dl->ckl", gw, D[:d]) + torch.einsum("ckd,dl->ckl", gw * dw_draw, D[d:])
            z = z - torch.exp(p["log_inner_lr"]) * gz
        w, _ = decode(z, cfg["inner_steps"])
        for _ in range(cfg["finetune_steps"]):
            w = w - torch.exp(p["log_finetune_lr"]) * grad_w(w)
        all_logits.append(xq @ w.mean(1).T)
        if noise is None:
            kls.append(torch.zeros((), dtype=xs.dtype))
            penalties.append(torch.zeros((), dtype=xs.dtype))
        else:
            kls.append(torch.cat(kl_terms).mean())
            target = z.detach() if targets is None else targets[t]
            penalties.append(((target - start) ** 2).mean())
        adapted.append(z.detach())
    return torch.stack(all_logits), torch.stack(kls), torch.stack(penalties), adapted


def regularizers_by_hand(p: dict, cfg: dict) -> torch.Tensor:
    l2 = sum((p[k] ** 2).sum() / 2 for k in ["encoder.weight", *(f"relation.{i}.weight" for i in range(3)), "decoder.weight"])
    rows = p["decoder.weight"].T
    L = rows.shape[0]
    ortho = sum((rows[a] @ rows[b] / (rows[a].norm() * rows[b].norm()) - float(a == b)) ** 2
                for a in range(L) for b in range(L)) / L ** 2
    return cfg["l2_penalty_weight"] * l2 + cfg["orthogonality_penalty_weight"] * ortho


def noise_for(seed: int, batch: TaskBatch, cfg: dict) -> dict:
    torch.manual_seed(seed)
    T, n, d = batch.support_x.shape
    N, K = batch.ways, n // batch.ways
    z = torch.randn(T, N, K, cfg["latent_size"], dtype=torch.float64)
    return {"z": z, "w": [torch.randn(T, N, K, d, dtype=torch.float64) for _ in range(cfg["inner_steps"] + 1)]}


def meta_loss_by_hand(p: dict, batch: TaskBatch, cfg: dict, noise: dict, targets: list | None = None) -> torch.Tensor:
    logits, kl, penalty, _ = leo_by_hand(p, batch, cfg, noise, targets)
    ce = torch.stack([F.cross_entropy(logits[t], batch.query_y[t]) for t in range(batch.num_tasks)])
    return (ce + cfg["kl_weight"] * kl + cfg["encoder_penalty_weight"] * penalty).mean() + regularizers_by_hand(p, cfg)


# ---------------------------------------------------------------- the algorithm


def test_evaluate_matches_the_reference_and_is_clean():
    algo, batch = tiny(), random_batch()
    p0 = params_of(algo)
    out = algo.evaluate(batch)
    logits, _, _, _ = leo_by_hand(p0, batch, CFG, None)
    for t in range(TASKS):
        assert math.isclose(float(out["loss"][t]), float(F.cross_entropy(logits[t], batch.query_y[t])), rel_tol=1e-9)
        assert float(out["accuracy"][t]) == pytest.approx(float((logits[t].argmax(1) == batch.query_y[t]).double().mean()))
    assert not out["loss"].requires_grad
    for name, p in algo.named_parameters():  # nothing changed, nothing left behind
        assert torch.equal(p, p0[name]) and p.grad is None, name
    alone = algo.evaluate(batch[1:2])  # a task's score does not depend on its batch
    torch.testing.assert_close(alone["loss"], out["loss"][1:2], rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # evaluation adapts (inner steps) even when called under no_grad
        torch.testing.assert_close(algo.evaluate(batch)["loss"], out["loss"])


def test_meta_step_matches_the_reference_and_finite_differences():
    algo, batch = tiny(), random_batch()
    p0 = params_of(algo)
    torch.manual_seed(7)
    algo.zero_grad(set_to_none=True)
    metrics = algo.meta_step(batch)
    noise = noise_for(7, batch, CFG)
    logits, _, _, targets = leo_by_hand(p0, batch, CFG, noise)
    for t in range(TASKS):  # the reported loss is the query cross-entropy
        assert math.isclose(float(metrics["loss"][t]), float(F.cross_entropy(logits[t], batch.query_y[t])), rel_tol=1e-9)
    for name, p in algo.named_parameters():  # every part is meta-learned, the rates included
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    grad = {k: p.grad.clone() for k, p in algo.named_parameters()}

    g = torch.Generator().manual_seed(3)
    eps = 1e-6
    for name in p0:
        for _ in range(2):
            direction = {k: torch.zeros_like(v) for k, v in p0.items()}
            direction[name] = torch.randn(p0[name].shape, generator=g, dtype=torch.float64)
            plus = meta_loss_by_hand({k: p0[k] + eps * direction[k] for k in p0}, batch, CFG, noise, targets)
            minus = meta_loss_by_hand({k: p0[k] - eps * direction[k] for k in p0}, batch, CFG, noise, targets)
            fd = float(plus - minus) / (2 * eps)
            analytic = float((grad[name] * direction[name]).sum())
            assert abs(fd - analytic) <= 1e-6 * (1 + abs(fd)), (name, fd, analytic)


def test_any_episode_shape_and_config_checks():
    algo = tiny()
    for ways, shots in [(5, 1), (2, 4)]:  # classifier rows are decoded per class: no fixed head
        batch = random_batch(seed=ways, ways=ways, shots=shots, queries=3)
        algo.check_episode(ways, shots, 3)
        out = algo.evaluate(batch)
        logits, _, _, _ = leo_by_hand(params_of(algo), batch, CFG, None)
        assert math.isclose(float(out["loss"][0]), float(F.cross_entropy(logits[0], batch.query_y[0])), rel_tol=1e-9)
        algo.meta_step(batch)
    for bad in [dict(latent_size=0), dict(inner_steps=-1), dict(dropout=1.0), dict(kl_weight=-1.0), dict(init_scale=0.0),
                dict(finetune_lr=0.0)]:
        with pytest.raises(ConfigError, match=next(iter(bad))):
            tiny(**bad)


def test_dropout_and_sampling_only_in_meta_training():
    algo, batch = tiny(dropout=0.5), random_batch()
    first, second = algo.evaluate(batch), algo.evaluate(batch)
    torch.testing.assert_close(first["loss"], second["loss"], rtol=0, atol=0)  # deterministic: means, no dropout
    torch.manual_seed(1)
    a = algo.meta_step(batch)["loss"]
    torch.manual_seed(2)
    b = algo.meta_step(batch)["loss"]
    assert not torch.equal(a, b)  # meta-training samples
    torch.manual_seed(1)
    torch.testing.assert_close(algo.meta_step(batch)["loss"], a, rtol=0, atol=0)  # ... from torch's seeded generator


# ---------------------------------------------------------------- learning, the CLI, the preset

# LEO on features: the learning fixture's glyphs (5-way 1-shot, meta-batch 8) embedded by the
# session's short baseline run (conftest BASELINE_RUN: conv4-32, 40 steps), backbone=identity,
# the algorithm's defaults, Adam 3e-3. Measured with seeds 0-5 (test accuracy over 200 fixed test
# episodes, before -> after 100 steps; one thread on a busy shared 2-core machine):
#   leo, 100 steps: 0.625-0.659 -> 0.674, 0.689, 0.683, 0.682, 0.674, 0.684 (gains 0.016-0.059; 7-9 s a seed)
# The untrained LEO already adapts (5 latent steps from its random decoder) on good features, hence the
# small gains; the thresholds sit below the worst seed (0.05 of accuracy, 0.006 of gain).
# Chance is 0.2; the features alone give about 0.69 with a nearest-class-mean rule.


def test_learns_on_pretrained_features(learning, baseline_run, tmp_path):
    cfg = to_run_config({
        "algo": {"name": "leo"},
        "data": {"name": "features", "run": str(baseline_run), "root": str(tmp_path)},
        "backbone": {"name": "identity"}, "device": {"type": "cpu"},
        "ways": 5, "shots": 1, "queries": 5, "meta_batch_size": 8, "steps": 100, "seed": 0,
        "eval": {"ways": 5, "shots": 1, "queries": 5, "batch_size": 50}, "optim": {"name": "adam", "lr": 3e-3},
    })
    from metalearn import engine

    stores = engine.load_data(cfg, torch.device("cpu"))
    assert stores["train"].input_shape == (32,) and stores["test"].num_classes == 50
    before, after, seconds = learning.run(cfg, stores)
    print(f"leo 5-way 1-shot glyph features: {before:.3f} -> {after:.3f} in {seconds:.1f}s")
    assert after >= 0.62
    assert after >= before + 0.01


def test_baseline_then_leo_through_the_cli(cli, baseline_run, tmp_path):
    run_dir, root = tmp_path / "leo", tmp_path / "data"
    args = ["train", "algo=leo", "data=features", f"data.run={baseline_run}", f"data.root={root}", "backbone=identity",
            "meta_batch_size=4", "steps=20", "trainer.log_every=5", "trainer.val_every=10", "trainer.val_episodes=20",
            "trainer.test_episodes=20", "trainer.ckpt_every=10", "queries=5", f"hydra.run.dir={run_dir}"]
    proc = cli.run(args, tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test"]["accuracy"]["episodes"] == 20 and "ci95" in results["test"]["accuracy"]
    assert list(run_dir.glob("events.out.tfevents.*")) and (run_dir / "checkpoints" / "best.pt").is_file()
    caches = list((root / "features").glob("glyphs-*.pt"))
    assert len(caches) == 1  # the features were computed once, into the data root
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["algo"]["name"] == "leo" and ckpt["config"]["data"]["name"] == "features"
    assert ckpt["model"]["log_inner_lr"].abs().max() > 0  # the rates are learned (from log 1 = 0)
    # eval reads the cache (no second extraction) and reproduces the run's test
    mtime = caches[0].stat().st_mtime_ns
    proc = cli.run(["eval", f"run={run_dir}"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    assert f"{100 * results['test']['accuracy']['mean']:.2f}%" in proc.stdout
    assert caches[0].stat().st_mtime_ns == mtime


def test_registered_and_preset_is_a_valid_config():
    from hydra import compose
    from metalearn import confdir

    assert algorithm_module("leo") is leo_mod
    with confdir.initialized():
        cfg = to_run_config(compose("config", overrides=["experiment=leo_miniimagenet_5w1s"]))
    assert (cfg.algo.name, cfg.data.name, cfg.data.source, cfg.backbone.name) == ("leo", "features", "miniimagenet", "identity")
    assert (cfg.ways, cfg.shots, cfg.queries, cfg.meta_batch_size) == (5, 1, 15, 12)
    assert (cfg.algo.inner_steps, cfg.algo.finetune_steps, cfg.algo.latent_size) == (5, 5, 64)
    assert (cfg.optim.lr, cfg.optim.grad_clip) == (pytest.approx(2.739071e-4), 0.1)
