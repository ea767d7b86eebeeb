"""Time one meta-step of an algorithm (and the episode sampler alone) on glyphs episodes.

    python scripts/bench_meta_step.py --algo maml --ways 5 --shots 1 --queries 15 --meta-batch-size 32

Prints median / min / max seconds per meta-step (after warm-up), tasks/s and the
sampler's share of a step, and writes them as JSON with --out. Issue #5 grows
this into the side-by-side benchmark against a plain per-task reference loop.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from metalearn.config import to_run_config
from metalearn.engine import build_algorithm, build_optimizer, load_data, resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", default="maml")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--meta-batch-size", type=int, default=32)
    p.add_argument("--first-order", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    algo_cfg = {"name": a.algo, **({"first_order": a.first_order} if a.algo == "maml" else {})}
    cfg = to_run_config({
        "algo": algo_cfg, "data": {"name": "glyphs", "train_classes": 100, "val_classes": 20, "test_classes": 20},
        "backbone": {"name": "conv4"}, "device": {"type": a.device}, "ways": a.ways, "shots": a.shots,
        "queries": a.queries, "meta_batch_size": a.meta_batch_size,
        "eval": {"ways": a.ways, "shots": a.shots, "queries": a.queries, "batch_size": a.meta_batch_size},
    })
    device = resolve_device(cfg.device.type)
    torch.manual_seed(0)
    stores = load_data(cfg, device)
    algo = build_algorithm(cfg, stores["train"]).to(device)
    optimizer, _ = build_optimizer(cfg, algo.parameters())
    sampler = stores["train"].sampler(a.ways, a.shots, a.queries, a.meta_batch_size, seed=0, training=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        batch = sampler.sample()
        optimizer.zero_grad(set_to_none=True)
        algo.meta_step(batch)
        optimizer.step()

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.repeats):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    sample_times = []
    for _ in range(20):
        sync()
        t = time.perf_counter()
        sampler.sample()
        sync()
        sample_times.append(time.perf_counter() - t)
    med = statistics.median(times)
    result = {
        "algo": a.algo, "first_order": a.first_order, "ways": a.ways, "shots": a.shots, "queries": a.queries,
        "meta_batch_size": a.meta_batch_size, "device": str(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "seconds_per_step": {"median": med, "min": min(times), "max": max(times), "repeats": a.repeats},
        "tasks_per_second": a.meta_batch_size / med,
        "sampler_seconds": statistics.median(sample_times),
        "sampler_share_of_step": statistics.median(sample_times) / med,
    }
    print(json.dumps(result, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
