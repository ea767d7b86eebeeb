"""Reptile's per-task loop against its folded path (algo.batched=loop vs fold), alternating in one process.

    python scripts/bench_reptile.py [--threads 2] [--repeats 5]

Times, on the same batches, the meta-step (with the Adam step) and the evaluation of one meta-batch:
* sinusoid: mlp 40-40, K = 10 (shots 10, queries 10), meta-batch 25, inner_batch_size 10, 5 inner steps,
  50 test inner steps (the MAML/Reptile sinusoid setting);
* glyphs: conv4-64 at 28x28, 5-way 1-shot, 15 queries, meta-batch 5, 5 inner steps of 10, 50 test inner steps.
Prints the medians and the ratio loop / fold (> 1: the folded path is faster). The two paths give the same
numbers up to float rounding (tests/test_reptile_batched.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from metalearn import engine
from metalearn.config import to_run_config


def build(data: dict, backbone: dict, batched: str, shots: int, queries: int, batch: int):
    cfg = to_run_config({"algo": {"name": "reptile", "batched": batched, "task_chunk": 0}, "data": data,
                         "backbone": backbone, "device": {"type": "cpu"}, "ways": 5, "shots": shots,
                         "queries": queries, "meta_batch_size": batch, "steps": 100})
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cases = {
        "sinusoid": ({"name": "sinusoid"}, {"name": "mlp", "hidden": [40, 40]}, 10, 10, 25),
        "glyphs": ({"name": "glyphs", "split_sizes": [40, 10, 10]}, {"name": "conv4"}, 1, 15, 5),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, (data, backbone, shots, queries, batch) in cases.items():
        cfgs = {b: build(data, backbone, b, shots, queries, batch) for b in ("loop", "fold")}
        stores = engine.load_data(cfgs["loop"], torch.device("cpu"))
        algos, optims = {}, {}
        for b, cfg in cfgs.items():
            torch.manual_seed(0)
            algos[b] = engine.build_algorithm(cfg, stores["train"])
            optims[b] = engine.build_optimizer(cfg, algos[b].parameters())[0]
        batches = [stores["train"].sampler(5, shots, queries, batch, seed).sample() for seed in range(a.repeats + 1)]
        times = {(b, what): [] for b in algos for what in ("meta_step", "evaluate")}
        for i, episode in enumerate(batches):
            for b, algo in algos.items():
                start = time.perf_counter()
                optims[b].zero_grad()
                algo.meta_step(episode)
                optims[b].step()
                step = time.perf_counter() - start
                start = time.perf_counter()
                algo.evaluate(episode)
                evaluation = time.perf_counter() - start
                if i:  # the first batch warms up
                    times[(b, "meta_step")].append(step)
                    times[(b, "evaluate")].append(evaluation)
        for what in ("meta_step", "evaluate"):
            loop, fold = (statistics.median(times[(b, what)]) for b in ("loop", "fold"))
            print(f"{name:9} {what:10} loop {1e3 * loop:8.1f} ms  fold {1e3 * fold:8.1f} ms  loop/fold {loop / fold:5.2f}x")


if __name__ == "__main__":
    main()
