"""The learn2learn wrapper's MAML step against metalearn's native MAML, in the same run, on the same tasks.

    python scripts/bench_l2l_maml.py --threads 2 --repeats 3 --meta-batch-size 32 --out bench_l2l.json
    python scripts/bench_l2l_maml.py --first-order --repeats 10
    python scripts/bench_l2l_maml.py --ways 20 --shots 5 --queries 5 --meta-batch-size 16

Side A, ``native``, is metalearn's own MAML: ``algo.meta_step(batch)`` and an Adam step, built through
``metalearn.engine`` exactly as ``metalearn train`` builds them and as ``scripts/bench_meta_step.py`` does
(conv4-64 backbone, glyphs 28x28 episodes, algo.batched=auto: the per-task loop on CPU). Side B,
``learn2learn``, is the learn2learn pattern through ``metalearn.learn2learn.algorithms.MAML`` wrapping a
deep copy of side A's ``algo.net`` (the same module and initial weights): for each task
``learner = maml.clone()``, ``learner.adapt(support loss)`` per inner step, then the query loss divided
by the number of tasks and its ``backward()``; then the same Adam (class and hyper-parameters as side
A's optimiser). Defaults: 5-way 1-shot, 15 queries, meta-batch 32, inner lr 0.4, one inner step,
second order (``--first-order``: FOMAML on both sides).

* Timing: both sides run on the same batches, alternating A/B/A/B after ``--warmup`` steps of each,
  in one process, on ``--threads`` CPU threads; medians of ``--repeats`` (also min and max) of the
  wall-clock time, and of the process's CPU time over the step (all its threads: less disturbed than
  wall time by other processes, though idle OpenMP threads spinning count in it). The ratio is
  learn2learn time / native time (> 1: the wrapper is slower). The machine's load average
  (``os.getloadavg``) is recorded before and after: on a shared machine, timings are only comparable
  within one run.
* Gradients: from identical weights (before either side takes a step) on the first batch, the
  wrapper's meta-gradient against the native one: the largest absolute difference over all entries,
  that difference relative to the largest gradient entry (conv biases before BatchNorm have gradients
  that are zero up to rounding, so entry-wise ratios would mean nothing), and the tensor where it is.
  Also each side against the wrapper run in float64 on a float64 copy (the float32 rounding of
  either side; a max-pool or ReLU near-tie decided differently in float64 can add to it).

Prints and writes (--out) one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import metalearn.learn2learn as l2l
from metalearn.config import to_run_config
from metalearn.data import TaskBatch
from metalearn.engine import build_algorithm, build_optimizer, load_data, resolve_device


def engine_config(a):
    """The run config of the native side (as scripts/bench_meta_step.py builds MAML's)."""
    return to_run_config({
        "algo": {"name": "maml", "first_order": a.first_order, "inner_lr": a.inner_lr, "inner_steps": a.inner_steps},
        "data": {"name": "glyphs", "split_sizes": [100, 20, 20]},
        "backbone": {"name": "conv4", "hidden": a.hidden}, "device": {"type": a.device},
        "ways": a.ways, "shots": a.shots, "queries": a.queries, "meta_batch_size": a.meta_batch_size,
        "optim": {"name": "adam", "lr": a.outer_lr},
        "eval": {"ways": a.ways, "shots": a.shots, "queries": a.queries, "batch_size": a.meta_batch_size},
    })


class Native:
    """metalearn's MAML: ``algo.meta_step`` and the engine's optimiser."""

    def __init__(self, a, stores, device):
        cfg = engine_config(a)
        torch.manual_seed(0)
        self.algo = build_algorithm(cfg, stores["train"]).to(device)
        self.optimizer, _ = build_optimizer(cfg, self.algo.parameters())

    def meta_step(self, batch):
        self.algo.meta_step(batch)

    def step(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        self.meta_step(batch)
        self.optimizer.step()

    def grads(self) -> dict:
        """The meta-gradient, by the wrapped module's parameter names (net.0.convs.0.weight -> 0.convs.0.weight)."""
        return {k.removeprefix("net."): p.grad for k, p in self.algo.named_parameters()}


class Learn2Learn:
    """The learn2learn pattern: ``l2l.algorithms.MAML`` around a copy of ``net``, clone/adapt per task."""

    def __init__(self, net, a, optimizer: torch.optim.Optimizer):
        self.maml = l2l.algorithms.MAML(copy.deepcopy(net), lr=a.inner_lr, first_order=a.first_order)
        # The native side's optimiser class and hyper-parameters (Adam, lr --outer-lr, its defaults).
        self.optimizer = type(optimizer)(self.maml.parameters(), **optimizer.defaults)
        self.steps = a.inner_steps

    def meta_step(self, batch):
        tasks = batch.support_x.shape[0]
        for t in range(tasks):
            learner = self.maml.clone()
            for _ in range(self.steps):
                learner.adapt(F.cross_entropy(learner(batch.support_x[t]), batch.support_y[t]))
            (F.cross_entropy(learner(batch.query_x[t]), batch.query_y[t]) / tasks).backward()

    def step(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        self.meta_step(batch)
        self.optimizer.step()

    def grads(self) -> dict:
        return {k: p.grad for k, p in self.maml.module.named_parameters()}


# ------------------------------------------------------------------ measurements


def make_sync(device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def as_float64(batch) -> TaskBatch:
    f = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    return TaskBatch(*(f(getattr(batch, n)) for n in ("support_x", "support_y", "query_x", "query_y", "classes")))


def meta_gradient(side, batch) -> dict:
    for p in side.optimizer.param_groups[0]["params"]:
        p.grad = None
    side.meta_step(batch)
    grads = {k: g.detach().clone() for k, g in side.grads().items()}
    for p in side.optimizer.param_groups[0]["params"]:
        p.grad = None
    return grads


def off(grads: dict, target: dict) -> float:
    """Max abs difference over all tensors, relative to the target's largest entry."""
    scale = max(t.abs().max().item() for t in target.values())
    return max((grads[k].double() - target[k].double()).abs().max().item() for k in target) / scale


def gradient_agreement(native: Native, wrapper: Learn2Learn, a, batch) -> dict:
    """The wrapper's meta-gradient against the native one, from the same weights on ``batch``; each
    against the wrapper in float64."""
    got = meta_gradient(wrapper, batch)
    want = meta_gradient(native, batch)
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    scale = max(w.abs().max().item() for w in want.values())
    worst = max(want, key=lambda k: (got[k].double() - want[k].double()).abs().max().item())
    max_abs = (got[worst].double() - want[worst].double()).abs().max().item()
    wrapper64 = Learn2Learn(copy.deepcopy(wrapper.maml.module).double(), a, wrapper.optimizer)
    truth = meta_gradient(wrapper64, as_float64(batch))
    return {"max_abs_diff": max_abs, "max_rel_diff": max_abs / scale, "largest_gradient": scale,
            "worst_tensor": worst, "native_vs_float64": off(want, truth), "learn2learn_vs_float64": off(got, truth)}


def time_alternating(sides: dict, batches: list, warmup: int, repeats: int, sync) -> tuple[dict, dict]:
    """Run every side on the same batches, A/B/A/B..., and return the wall-clock seconds of each timed step
    and the CPU seconds this process spent in it (all threads)."""
    for i in range(warmup):
        for side in sides.values():
            side.step(batches[i % len(batches)])
    times = {name: [] for name in sides}
    cpu = {name: [] for name in sides}
    for r in range(repeats):
        batch = batches[(warmup + r) % len(batches)]
        for name, side in sides.items():
            sync()
            t, c = time.perf_counter(), time.process_time()
            side.step(batch)
            sync()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return times, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--meta-batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--first-order", action="store_true", help="FOMAML on both sides")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    load_before = os.getloadavg()
    device = resolve_device(a.device)
    sync = make_sync(device)
    cfg = engine_config(a)
    stores = load_data(cfg, device)
    sampler = stores["train"].sampler(a.ways, a.shots, a.queries, a.meta_batch_size, seed=0, training=True)
    batches = [sampler.sample() for _ in range(max(2, a.warmup + a.repeats))]
    native = Native(a, stores, device)
    wrapper = Learn2Learn(native.algo.net, a, native.optimizer)

    agreement = gradient_agreement(native, wrapper, a, batches[0])
    times, cpu = time_alternating({"native": native, "learn2learn": wrapper}, batches, a.warmup, a.repeats, sync)
    med = {name: statistics.median(v) for name, v in times.items()}
    load_after = os.getloadavg()

    result = {
        "first_order": a.first_order, "inner_steps": a.inner_steps, "inner_lr": a.inner_lr, "ways": a.ways,
        "shots": a.shots, "queries": a.queries, "meta_batch_size": a.meta_batch_size, "hidden": a.hidden,
        "native_batched": native.algo.cfg.batched, "native_folds": native.algo.folds(batches[0]),
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_average_before": list(load_before), "load_average_after": list(load_after),
        "warmup": a.warmup, "repeats": a.repeats,
        "sides": {
            name: {"seconds_per_step": {"median": med[name], "min": min(times[name]), "max": max(times[name])},
                   "tasks_per_second": a.meta_batch_size / med[name], "all": times[name],
                   "cpu_seconds_per_step": {"median": statistics.median(cpu[name]), "all": cpu[name]}}
            for name in times
        },
        "learn2learn_over_native": med["learn2learn"] / med["native"],
        "learn2learn_over_native_cpu": statistics.median(cpu["learn2learn"]) / statistics.median(cpu["native"]),
        "gradient_learn2learn_vs_native": agreement,
    }
    print(json.dumps(result, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
