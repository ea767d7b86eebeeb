"""The one training loop, for every algorithm.

sample episodes -> ``algo.meta_step`` -> clip / optimizer / scheduler -> log
-> validate -> checkpoint -> (resume) ... -> test with the best checkpoint.

Metrics stay on the device between log steps, so an accelerator is never
made to wait for the host inside the loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from metalearn import __version__, checkpoint
from metalearn.algorithms import Algorithm, ProblemInfo, algorithm_module
from metalearn.config import RunConfig, flat, to_dict
from metalearn.data import ClassStore, EpisodeSampler, TaskBatch, dataset_module
from metalearn.errors import ConfigError, TrainingError
from metalearn.fileio import atomic_write_json
from metalearn.models import backbone_module
from metalearn.tracking import TensorBoard

log = logging.getLogger("metalearn")


# ---------------------------------------------------------------- building blocks


def resolve_device(kind: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(kind)
    except RuntimeError:
        raise ConfigError(f"device.type={kind!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but this torch sees no CUDA GPU; use device=auto or device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps but MPS is not available here; use device=auto or device=cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(cfg: RunConfig, device: torch.device) -> dict[str, ClassStore]:
    stores = dataset_module(cfg.data.name).load(cfg.data)
    stores["train"].check_episode("train", cfg.ways, cfg.shots, cfg.queries)
    for split in ("val", "test"):
        stores[split].check_episode(split, cfg.eval.ways, cfg.eval.shots, cfg.eval.queries)
    if cfg.device.data_on_device:
        for store in stores.values():
            store.to(device)
    return stores


def build_algorithm(cfg: RunConfig, train_store: ClassStore) -> Algorithm:
    backbone = backbone_module(cfg.backbone.name).build(cfg.backbone, train_store.image_shape)
    info = ProblemInfo(image_shape=train_store.image_shape, ways=cfg.ways, num_train_classes=train_store.num_classes)
    algo = algorithm_module(cfg.algo.name).build(cfg.algo, backbone, info)
    algo.check_episode(cfg.ways, cfg.shots, cfg.queries)
    algo.check_episode(cfg.eval.ways, cfg.eval.shots, cfg.eval.queries)
    return algo


def build_optimizer(cfg: RunConfig, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    o = cfg.optim
    if o.name == "adam":
        opt = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    elif o.scheduler == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=o.decay_every, gamma=o.decay_gamma)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def mean_ci95(values: torch.Tensor) -> dict[str, float]:
    """Mean and 95% confidence interval half-width, 1.96 * std / sqrt(n), as the few-shot papers report."""
    v = values.double().cpu()
    std = float(v.std(correction=0)) if v.numel() > 1 else 0.0
    return {"mean": float(v.mean()), "ci95": 1.96 * std / math.sqrt(v.numel()), "std": std, "episodes": v.numel()}


def evaluate(algo: Algorithm, store: ClassStore, ways: int, shots: int, queries: int,
             episodes: int, batch_size: int, seed: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Mean and 95% CI of every metric over ``episodes`` fixed episodes (fixed by ``seed``)."""
    algo.eval()
    per_task: dict[str, list[torch.Tensor]] = {}
    # Episodes are drawn one at a time, so the episode stream (and the result) does not depend on batch_size.
    sampler = EpisodeSampler(store, ways, shots, queries, 1, seed)
    for start in range(0, episodes, batch_size):
        batch = TaskBatch.cat([sampler.sample() for _ in range(min(batch_size, episodes - start))]).to(device)
        for k, v in algo.evaluate(batch).items():
            per_task.setdefault(k, []).append(v.detach())
    algo.train()
    return {k: mean_ci95(torch.cat(v)) for k, v in per_task.items()}


@contextlib.contextmanager
def stop_requests() -> Iterator[dict]:
    """SIGINT/SIGTERM ask the loop to stop after the current step (with a checkpoint); a second one kills."""
    flag: dict[str, Any] = {"signal": None}

    def handler(signum, frame):
        flag["signal"] = signum
        signal.signal(signum, previous[signum])

    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not in the main thread: no handlers
            previous[s] = signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- the loop


@dataclass
class Best:
    value: float | None = None
    step: int | None = None

    def improves(self, value: float, higher_is_better: bool) -> bool:
        return self.value is None or (value > self.value if higher_is_better else value < self.value)


class Stopped(Exception):
    """The run stopped early on request; its last checkpoint can be resumed."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def train(cfg: RunConfig, run_dir: Path, resume_from: dict | None = None) -> dict:
    """Meta-train, validate, checkpoint and test. Returns the results written to results.json."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device.type)
    seed_everything(cfg.seed)
    stores = load_data(cfg, device)
    algo = build_algorithm(cfg, stores["train"]).to(device)
    optimizer, scheduler = build_optimizer(cfg, algo.parameters())
    sampler = EpisodeSampler(stores["train"], cfg.ways, cfg.shots, cfg.queries, cfg.meta_batch_size, cfg.seed)
    ckpt_dir = run_dir / "checkpoints"
    step, best = 0, Best()
    if resume_from is not None:
        checkpoint.load_model_state(algo, resume_from["model"], ckpt_dir / "last.pt")
        optimizer.load_state_dict(resume_from["optimizer"])
        scheduler.load_state_dict(resume_from["scheduler"])
        sampler.load_state_dict(resume_from["sampler"])
        checkpoint.set_rng_state(resume_from["rng"])
        step, best = resume_from["step"], Best(**resume_from["best"])
        log.info("resumed %s at step %d", run_dir, step)

    def save(name: str) -> None:
        checkpoint.save(
            ckpt_dir / f"{name}.pt", step=step, model=algo.state_dict(), optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(), sampler=sampler.state_dict(), rng=checkpoint.rng_state(),
            best={"value": best.value, "step": best.step}, metric=algo.primary_metric, config=to_dict(cfg),
        )

    tb = TensorBoard(run_dir, purge_step=step + 1 if step else None)
    if step == 0:
        tb.hparams({k: v for k, v in flat(to_dict(cfg)).items()
                    if not k.startswith(("trainer.", "device.", "data.root", "resume"))})
    params = list(algo.parameters())
    n_params = sum(p.numel() for p in params)
    log.info("%s on %s (%s, %d-way %d-shot, %d parameters) on %s -> %s", cfg.algo.name, cfg.data.name,
             cfg.backbone.name, cfg.ways, cfg.shots, n_params, device, run_dir)
    t = cfg.trainer
    sums: dict[str, torch.Tensor] = {}
    since, last_ok, tick = 0, step, time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc="meta-train", unit="step", dynamic_ncols=True,
               disable=None if t.progress else True, leave=False)
    try:
        with stop_requests() as stop:
            algo.train()
            while step < cfg.steps:
                batch = sampler.sample().to(device)
                optimizer.zero_grad(set_to_none=True)
                metrics = algo.meta_step(batch)
                if cfg.optim.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                since += 1
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0) + v.detach().mean()
                bar.update()
                last = step == cfg.steps
                stopping = stop["signal"] is not None or step == t.stop_at
                if step % t.log_every == 0 or last or stopping or step % t.ckpt_every == 0:
                    train_means = {k: float(v) / since for k, v in sums.items()}
                    if not all(math.isfinite(v) for v in train_means.values()):
                        raise TrainingError(
                            f"the training loss became NaN/inf between steps {last_ok + 1} and {step}; "
                            f"{ckpt_dir / 'last.pt'} keeps the last good state; lower optim.lr or the inner learning rate, "
                            f"or set optim.grad_clip, then start again"
                        )
                    elapsed = time.perf_counter() - tick
                    rate = since * cfg.meta_batch_size / max(elapsed, 1e-9)
                    scalars = {f"train/{k}": v for k, v in train_means.items()}
                    scalars.update({"train/lr": optimizer.param_groups[0]["lr"], "train/tasks_per_second": rate})
                    tb.scalars(step, scalars)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in train_means.items()} | {"tasks/s": f"{rate:.0f}"})
                    if bar.disable:
                        log.info("step %d/%d %s %.0f tasks/s", step, cfg.steps,
                                 " ".join(f"{k} {v:.4f}" for k, v in train_means.items()), rate)
                    sums, since, last_ok, tick = {}, 0, step, time.perf_counter()
                if step % t.val_every == 0 or last:
                    val = evaluate(algo, stores["val"], cfg.eval.ways, cfg.eval.shots, cfg.eval.queries,
                                   t.val_episodes, cfg.eval.batch_size, t.eval_seed, device)
                    value = val[algo.primary_metric]["mean"]
                    tb.scalars(step, {f"val/{k}": v["mean"] for k, v in val.items()})
                    if best.improves(value, algo.higher_is_better):
                        best = Best(value, step)
                        save("best")
                    tb.scalars(step, {f"val/best_{algo.primary_metric}": best.value})
                    log.info("step %d val %s %s (best %.4f at step %d)", step, algo.primary_metric,
                             _fmt(val[algo.primary_metric]), best.value, best.step)
                    tick = time.perf_counter()  # validation time is not training throughput
                if step % t.ckpt_every == 0 or last or stopping:
                    save("last")
                if stopping and not last:
                    how = "interrupted" if stop["signal"] is not None else f"stopped at trainer.stop_at={t.stop_at}"
                    code = 128 + stop["signal"] if stop["signal"] is not None else 0
                    raise Stopped(f"{how}: saved step {step}; continue with: metalearn train resume={run_dir}", code)
        bar.close()
        results = test(algo, cfg, stores["test"], device, ckpt_dir / "best.pt")
        results.update(best_val={"metric": algo.primary_metric, "value": best.value, "step": best.step},
                       steps=cfg.steps, run_dir=str(run_dir), version=__version__)
        tb.scalars(cfg.steps, {f"test/{k}": v["mean"] for k, v in results["test"].items()})
        tb.scalars(cfg.steps, {f"test/{k}_ci95": v["ci95"] for k, v in results["test"].items()})
        atomic_write_json(run_dir / "results.json", results)
        return results
    finally:
        bar.close()
        tb.close()


def test(algo: Algorithm, cfg: RunConfig, store: ClassStore, device: torch.device, best_path: Path) -> dict:
    """Evaluate the best-validation weights on ``trainer.test_episodes`` test episodes."""
    ckpt = checkpoint.load(best_path)
    checkpoint.load_model_state(algo, ckpt["model"], best_path)
    e = cfg.eval
    metrics = evaluate(algo, store, e.ways, e.shots, e.queries, cfg.trainer.test_episodes, e.batch_size,
                       cfg.trainer.eval_seed + 1, device)
    return {"test": metrics, "checkpoint": str(best_path), "checkpoint_step": ckpt["step"],
            "episode": {"ways": e.ways, "shots": e.shots, "queries": e.queries}}


def _fmt(m: dict[str, float]) -> str:
    return f"{m['mean']:.4f} +- {m['ci95']:.4f}"


def format_result(name: str, m: dict[str, float], percent: bool) -> str:
    if percent:
        return f"{name}: {100 * m['mean']:.2f}% +- {100 * m['ci95']:.2f}% (95% CI, {m['episodes']} episodes)"
    return f"{name}: {m['mean']:.4f} +- {m['ci95']:.4f} (95% CI, {m['episodes']} episodes)"


def print_results(results: dict) -> None:
    ep = results["episode"]
    print(f"test {ep['ways']}-way {ep['shots']}-shot ({ep['queries']} queries per class), checkpoint step {results['checkpoint_step']}:")
    for k, m in results["test"].items():
        print("  " + format_result(k, m, percent=k == "accuracy"))


def dump(results: dict) -> str:
    return json.dumps(results, indent=2)
