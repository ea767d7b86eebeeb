"""MetaNet's meta-step against MAML's on the same task shape (issue #15), and where MetaNet's time goes.

    python scripts/bench_metanet.py                          # 5-way 1-shot, 15 queries, conv4-64, 28x28, meta-batch 8
    python scripts/bench_metanet.py --sides metanet,maml --repeats 5 --out bench.json
    git show <old commit>:metalearn/algorithms/metanet.py > /tmp/metanet_before.py
    python scripts/bench_metanet.py --before /tmp/metanet_before.py   # also the earlier implementation

Sides, each built through ``metalearn.engine`` as ``metalearn train`` builds it, on glyphs episodes (28x28,
the shape of ``data=omniglot``), conv4 with ``--hidden`` filters and ``--layers`` blocks:

* ``metanet``: ``algo=metanet backbone.norm=none`` (``fast_body=true``: the full model);
* ``metanet_head``: the same with ``algo.fast_body=false`` (fast weights for the head layers only);
* ``maml``: ``algo=maml`` with its defaults (second order, 1 inner step, inner lr 0.4, BatchNorm with batch
  statistics): the side-by-side table's MAML;
* ``maml_nonorm``: the same with ``backbone.norm=none``, MetaNet's backbone;
* ``metanet_convs``: only the convolutions the full model's definition asks for (``ConvWork`` below):
  a floor for ``metanet`` with these convolution kernels;
* ``metanet_before`` (with ``--before FILE``): the MetaNet module in FILE (an earlier metanet.py), with the
  ``metanet`` side's weights; the meta-gradients of the two are compared on one batch.

Timing: one thread by default (``--threads``), as the README's side-by-side runs; every side runs
``zero_grad`` + ``meta_step`` on the same batches, alternating side after side after a warm-up, in one
process, without optimizer steps (the weights, and so the work, stay the same); medians of ``--repeats``.
Ratios are MetaNet's time over MAML's, measured in the same run, so they hold on a machine shared with
other jobs, where the seconds themselves do not.

Profile (``--profile``, default on): one meta-step of each MetaNet side under ``torch.profiler``, its
operators' self CPU time in three groups: ``convolutions`` (forward and backward of every convolution),
``generators`` (the fast-weight generators d and m, forward and backward: the operators on tensors with a
dimension of the generators' coordinate counts), ``other``; and the top operators.

Prints and writes (``--out``) one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time

import torch

from metalearn.algorithms import metanet as metanet_mod
from metalearn.config import to_run_config
from metalearn.engine import build_algorithm, load_data, problem_info
from metalearn.models import backbone_module
from metalearn.hostmem import retain_freed_memory

SIDES = ("metanet", "metanet_head", "maml", "maml_nonorm", "metanet_convs")


class ConvWork(torch.nn.Module):
    """The convolutions the full MetaNet's definition asks for per task, nothing else: u with slow and (shared)
    fast weights over the support and query images, b with slow and per-query fast weights over the queries,
    each forward and backward (weight and input gradients), the fast weights given (no generators, no
    meta-information). A floor for any implementation of the model with these convolution kernels."""

    def __init__(self, metanet):
        super().__init__()
        self.metanet = metanet
        self.weights = [n for n, p in metanet.named_parameters() if n.startswith("backbone.") and n.endswith("weight")]

    def meta_step(self, batch) -> None:
        algo, plan = self.metanet, self.metanet.plan
        p = dict(algo.named_parameters())
        slow = {n.removeprefix("backbone."): v for n, v in p.items() if n.startswith("backbone.")}
        key_slow = {n.removeprefix("key_backbone."): v for n, v in p.items() if n.startswith("key_backbone.")}
        for t in range(batch.num_tasks):
            m = len(batch.query_x[t])
            g = torch.Generator().manual_seed(t)
            key_fast = {n.removeprefix("backbone."): (0.01 * torch.randn(p[n].shape, generator=g)).requires_grad_()
                        for n in self.weights}
            fast = {n.removeprefix("backbone."): (0.01 * torch.randn((m, *p[n].shape), generator=g)).requires_grad_()
                    for n in self.weights}
            keys = metanet_mod.body(plan, key_slow, key_fast, torch.cat([batch.support_x[t], batch.query_x[t]]),
                                    transformed=False)
            h = metanet_mod.body(plan, slow, fast, batch.query_x[t], per_example=True, transformed=False)
            (keys.sum() + h.sum()).backward()


def run_config(a, side: str):
    metanet = side.startswith("metanet")
    algo = {"name": "metanet", "fast_body": side != "metanet_head"} if metanet else {"name": "maml"}
    norm = "none" if metanet or side == "maml_nonorm" else "batch"
    return to_run_config({
        "algo": algo, "data": {"name": "glyphs", "split_sizes": [100, 20, 20]},
        "backbone": {"name": "conv4", "hidden": a.hidden, "layers": a.layers, "norm": norm}, "device": {"type": "cpu"},
        "ways": a.ways, "shots": a.shots, "queries": a.queries, "meta_batch_size": a.meta_batch_size,
    })


def load_before(path: str):
    spec = importlib.util.spec_from_file_location("metanet_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["metanet_before"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def build_sides(a, store) -> dict:
    sides = {}
    for side in a.sides:
        torch.manual_seed(0)
        algo = build_algorithm(run_config(a, "metanet" if side == "metanet_convs" else side), store)
        sides[side] = ConvWork(algo) if side == "metanet_convs" else algo
    if a.before:
        cfg = run_config(a, "metanet")
        info = problem_info(cfg, store)
        backbone = backbone_module(cfg.backbone).build(cfg.backbone, info.input_shape)
        before = load_before(a.before).build(cfg.algo, backbone, info)
        before.load_state_dict(sides["metanet"].state_dict())
        sides["metanet_before"] = before
    return sides


def step(algo, batch) -> None:
    algo.zero_grad(set_to_none=True)
    algo.meta_step(batch)


def time_alternating(sides: dict, batches: list, warmup: int) -> dict[str, list[float]]:
    for batch in batches[:warmup]:
        for algo in sides.values():
            step(algo, batch)
    times = {name: [] for name in sides}
    for batch in batches[warmup:]:
        for name, algo in sides.items():
            start = time.perf_counter()
            step(algo, batch)
            times[name].append(time.perf_counter() - start)
    return times


def coordinate_counts(algo, a) -> set[int]:
    """The sizes the generators run over: each group's coordinate count (times the support examples for m),
    and the blocks they run in."""
    names = dict(algo.named_parameters())
    body = [n for n in names if n.startswith("backbone.convs.") and n.endswith("weight")] if algo.cfg.fast_body else []
    key_body = sum(names["key_" + n].numel() for n in body)
    base_body = sum(names[n].numel() for n in body)
    key_head = names["key_fc1.weight"].numel()
    base_head = names["fc1.weight"].numel() + names["fc2.weight"].numel()
    n = a.ways * a.shots
    sizes = {s for s in (key_body, key_head, n * base_body, n * base_head) if s}
    block = getattr(sys.modules[type(algo).__module__], "BLOCK", None)
    if block:  # the blocks (and last blocks) of the blocked generators
        sizes |= {block} | {s % block for s in sizes if s % block}
    return sizes


def profile(algo, batch, a) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    sizes = coordinate_counts(algo, a)
    step(algo, batch)  # warm
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step(algo, batch)
    groups = {"convolutions": 0.0, "generators": 0.0, "other": 0.0}
    ops = {}
    for e in prof.key_averages(group_by_input_shape=True):
        ms = e.self_cpu_time_total / 1000
        dims = {d for shape in (e.input_shapes or []) if isinstance(shape, list) for d in shape}
        if "conv" in e.key:
            group = "convolutions"
        elif dims & sizes or "Coordinate" in e.key or "lstm" in e.key:
            group = "generators"
        else:
            group = "other"
        groups[group] += ms
        label = f"{e.key} {e.input_shapes}"
        ops[label] = ops.get(label, 0.0) + ms
    total = sum(groups.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1])[: a.top]
    return {
        "self_cpu_ms_per_task": {k: round(v / a.meta_batch_size, 1) for k, v in groups.items()},
        "share": {k: round(v / total, 3) for k, v in groups.items()},
        "top_ops_ms_per_task": {k: round(v / a.meta_batch_size, 1) for k, v in top},
    }


def gradient_agreement(now, before, batch) -> dict:
    grads = []
    for algo in (now, before):
        step(algo, batch)
        grads.append({k: p.grad.clone() for k, p in algo.named_parameters() if p.grad is not None})
    scale = max(g.abs().max().item() for g in grads[1].values())
    worst = max(((grads[0][k] - g).abs().max().item(), k) for k, g in grads[1].items())
    return {"max_abs_difference": worst[0], "relative_to_largest_entry": worst[0] / scale, "at": worst[1],
            "same_parameters": sorted(grads[0]) == sorted(grads[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of: {', '.join(SIDES)}")
    parser.add_argument("--before", default=None, help="an earlier metanet.py to time (and compare) beside")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--meta-batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--top", type=int, default=12, help="operators listed per profile")
    parser.add_argument("--out", default=None)
    a = parser.parse_args()
    a.sides = [s for s in a.sides.split(",") if s]
    unknown = [s for s in a.sides if s not in SIDES]
    if unknown or (a.before and "metanet" not in a.sides):
        parser.error(f"unknown sides {unknown}" if unknown else "--before needs the metanet side")
    torch.set_num_threads(a.threads)
    retained = retain_freed_memory()  # as metalearn's CLI does (metalearn/hostmem.py)

    cfg = run_config(a, a.sides[0])
    store = load_data(cfg, torch.device("cpu"))["train"]
    sampler = store.sampler(a.ways, a.shots, a.queries, a.meta_batch_size, seed=0, training=True)
    batches = [sampler.sample() for _ in range(a.warmup + a.repeats)]
    sides = build_sides(a, store)

    times = time_alternating(sides, batches, a.warmup)
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": a.threads,
                    "torch": torch.__version__, "host_memory_retained": retained},
        "shape": {"ways": a.ways, "shots": a.shots, "queries": a.queries, "meta_batch_size": a.meta_batch_size,
                  "backbone": f"conv4-{a.hidden}, {a.layers} blocks, 28x28"},
        "seconds_per_step": {name: {"median": med[name], "min": min(t), "max": max(t)} for name, t in times.items()},
        "ratios": {f"{m}/{r}": med[m] / med[r] for m in med if m.startswith("metanet")
                   for r in med if r.startswith("maml")},
    }
    if "metanet_before" in med:
        result["ratios"]["metanet_before/metanet"] = med["metanet_before"] / med["metanet"]
        result["gradient_before_vs_now"] = gradient_agreement(sides["metanet"], sides["metanet_before"], batches[0])
    if a.profile:
        result["profile"] = {name: profile(algo, batches[0], a) for name, algo in sides.items()
                             if name.startswith("metanet") and name != "metanet_convs"}
    print(json.dumps(result, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
