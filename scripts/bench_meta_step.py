"""The engine's meta-step side by side with a plain per-task loop (issue #5).

    python scripts/bench_meta_step.py --algo maml --ways 5 --shots 1 --queries 15 --meta-batch-size 32 \\
        --threads 2 --batched auto,loop --out bench.json
    python scripts/bench_meta_step.py --algo protonet --batched loop,fold
    python scripts/bench_meta_step.py --device cuda --out bench_cuda.json

Side A is the engine: ``algo.meta_step(batch)`` and an Adam step, built through
``metalearn.engine`` exactly as ``metalearn train`` builds them (conv4 backbone,
glyphs episodes), once per ``--batched`` value (algo.batched: auto, loop, fold).
Side B, the reference, is written here independently of metalearn.algorithms:
a plain conv4 (conv, BatchNorm with batch statistics, ReLU, max-pool), and for
each task ``torch.func.functional_call`` + ``torch.autograd.grad`` (second
order unless --first-order), then the query loss's backward, then Adam. For
``--algo protonet``: per task, embed, class means, softmax over negative
squared distances, backward; ``--batched loop|fold`` runs the engine's
backbone task by task or all tasks as one batch.

* Timing: both sides run on the same batches, alternating A/B/A/B after warm-up,
  in one process; medians of ``--repeats``; the ratio is reference time / engine
  time (> 1: the engine is faster). On CUDA every timing synchronizes.
* Gradients: from identical weights and one batch, the engine's meta-gradient
  against the reference's (max abs difference, and relative to the largest
  gradient entry: conv biases before BatchNorm have gradients that are zero up
  to rounding, so entry-wise ratios would mean nothing). maml, metasgd, protonet.
  Each side is also set against the reference run in float64: its own float32
  rounding error (``engine_vs_float64``, ``reference_vs_float64``).
* Memory: each side runs two steps in a subprocess of its own, which reports the
  growth of its peak memory over them: CPU: peak resident set (VmHWM, reset
  before the steps; tracemalloc does not see torch's allocations); CUDA:
  torch.cuda.max_memory_allocated.
* Sampler: episodes/s of the glyphs sampler alone, and its share of an engine
  meta-step (goal: under 2%).
* Host memory (CPU): ``metalearn`` keeps freed memory for reuse (metalearn/hostmem.py),
  a plain script does not. ``--host-memory both`` (the default) times every side
  first with glibc's default malloc, then with the memory retained; the
  ``sides`` figures are the second phase's (both sides alike: the code's own
  speed), and ``metalearn_vs_plain_script`` sets the reference's first phase
  against each engine side's second.

Prints and writes (--out) one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalearn.config import to_run_config
from metalearn.data import TaskBatch
from metalearn.engine import build_algorithm, build_optimizer, load_data, resolve_device
from metalearn.hostmem import retain_freed_memory
from metalearn.models import ops

MAML_LIKE = ("maml", "metasgd")
#: the algorithms with a reference here; protonet's --batched is loop or fold of its backbone's tasks
BATCHED_ALGOS = (*MAML_LIKE, "protonet")


# ------------------------------------------------------------------ the reference, independent of metalearn


class RefConv4(nn.Module):
    """conv4 + linear head, written out: [n, C, H, W] -> [n, ways]; BatchNorm on the batch's statistics."""

    def __init__(self, in_channels: int, hidden: int, layers: int, features: int, ways: int | None):
        super().__init__()
        self.conv = nn.ModuleList(nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1) for i in range(layers))
        self.bn = nn.ModuleList(nn.BatchNorm2d(hidden, track_running_stats=False) for _ in range(layers))
        self.head = nn.Linear(features, ways) if ways else nn.Identity()  # no head: the embedding (ProtoNet)
        #: ReLU then 2x2 max-pool; ops.pool_relu (the same values and gradients, bitwise) where the decisions
        #: are measured (gradient_agreement)
        self.block_end = lambda x: F.max_pool2d(F.relu(x), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.conv, self.bn):
            x = self.block_end(bn(conv(x)))
        return self.head(x.flatten(1))


def ref_name(engine_name: str) -> str:
    """net.0.convs.2.weight -> conv.2.weight, net.0.norms.2.bias -> bn.2.bias, net.1.weight -> head.weight
    (ProtoNet: backbone.convs.2.weight -> conv.2.weight)."""
    for engine_prefix, ref_prefix in (("net.0.", ""), ("backbone.", "")):
        if engine_name.startswith(engine_prefix):
            engine_name = ref_prefix + engine_name[len(engine_prefix):]
            break
    return engine_name.replace("convs.", "conv.").replace("norms.", "bn.").replace("net.1.", "head.")


def ref_protonet_step(net: RefConv4, support_x, support_y, query_x, query_y, ways: int):
    """Per-task prototypical loss: embed, class means, softmax over negative squared distances."""
    tasks = support_x.shape[0]
    for t in range(tasks):
        support, query = net(support_x[t]), net(query_x[t])
        prototypes = torch.stack([support[support_y[t] == c].mean(0) for c in range(ways)])
        logits = -(query.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)
        (F.cross_entropy(logits, query_y[t]) / tasks).backward()


def ref_meta_step(net: RefConv4, support_x, support_y, query_x, query_y, inner_lr, steps: int, first_order: bool):
    """Per-task second-order (or first-order) MAML: fills .grad of net's parameters with the meta-gradient."""
    params = dict(net.named_parameters())
    tasks = support_x.shape[0]
    for t in range(tasks):
        fast = params
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(net, fast, (support_x[t],)), support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: w - (inner_lr[k] if isinstance(inner_lr, dict) else inner_lr) * g
                    for (k, w), g in zip(fast.items(), grads)}
        query_loss = F.cross_entropy(functional_call(net, fast, (query_x[t],)), query_y[t])
        (query_loss / tasks).backward()


class Reference:
    """The reference meta-learner with the engine algorithm's current weights (and Meta-SGD rates)."""

    def __init__(self, algo, a, device):
        bb = algo.net[0] if a.algo in MAML_LIKE else algo.backbone
        head = a.ways if a.algo in MAML_LIKE else None
        self.net = RefConv4(bb.convs[0].in_channels, a.hidden, len(bb.convs), bb.out_features, head).to(device)
        self.rates = None
        self.copy_from(algo)
        self.optimizer = torch.optim.Adam(list(self.net.parameters()) + list(self.rates.values() if self.rates else []),
                                          lr=a.outer_lr)
        self.a = a

    def copy_from(self, algo):
        ours = dict(self.net.named_parameters())
        with torch.no_grad():
            for k, p in algo.named_parameters():
                if k in ("inner_lrs",) or k.startswith("inner_lrs."):
                    continue
                ours[ref_name(k)].copy_(p)
        if hasattr(algo, "inner_lrs"):  # Meta-SGD: the learned rate of each parameter entry
            self.rates = {ref_name("net." + k): r.detach().clone().requires_grad_()
                          for (k, _), r in zip(algo.net.named_parameters(), algo.inner_lrs)}

    def grads(self) -> dict:
        return {k: p.grad for k, p in self.net.named_parameters()}

    def meta_step(self, batch):
        a = self.a
        if a.algo == "protonet":
            return ref_protonet_step(self.net, batch.support_x, batch.support_y, batch.query_x, batch.query_y, a.ways)
        ref_meta_step(self.net, batch.support_x, batch.support_y, batch.query_x, batch.query_y,
                      self.rates if self.rates else a.inner_lr, a.inner_steps, a.first_order)

    def step(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        self.meta_step(batch)
        self.optimizer.step()


# ------------------------------------------------------------------ the engine side


def engine_config(a, batched: str | None):
    """The run config of the engine side; ``batched`` is an algo.batched value, optionally with a task
    chunk after a colon (``fold:4``)."""
    algo = {"name": a.algo}
    batched, kernels, compiled = batched or "", "exact", False
    if batched.endswith("+compile"):  # e.g. loop+compile: device.compile=true
        compiled, batched = True, batched.removesuffix("+compile")
    if batched.endswith("+fast"):  # e.g. auto+fast: device.cpu_kernels=fast
        kernels, batched = "fast", batched.removesuffix("+fast")
    if a.algo in MAML_LIKE:
        algo.update(first_order=a.first_order, inner_lr=a.inner_lr, inner_steps=a.inner_steps)
        if batched.endswith("+ckpt"):  # e.g. loop+ckpt: algo.checkpoint_inner=true
            algo["checkpoint_inner"], batched = True, batched.removesuffix("+ckpt")
        mode, _, chunk = batched.partition(":")
        if mode:
            algo["batched"] = mode
        if chunk or a.task_chunk:
            algo["task_chunk"] = int(chunk or a.task_chunk)
    return to_run_config({
        "algo": algo, "data": {"name": "glyphs", "split_sizes": [100, 20, 20]},
        "backbone": {"name": "conv4", "hidden": a.hidden}, "device": {"type": a.device, "cpu_kernels": kernels, "compile": compiled},
        "ways": a.ways,
        "shots": a.shots, "queries": a.queries, "meta_batch_size": a.meta_batch_size,
        "optim": {"name": "adam", "lr": a.outer_lr},
        "eval": {"ways": a.ways, "shots": a.shots, "queries": a.queries, "batch_size": a.meta_batch_size},
    })


class Engine:
    def __init__(self, a, batched, stores, device):
        cfg = engine_config(a, batched)
        torch.manual_seed(0)  # the same initial weights for every --batched value
        self.algo = build_algorithm(cfg, stores["train"]).to(device)
        mode = (batched or "").removesuffix("+compile").removesuffix("+fast")
        if a.algo == "protonet" and mode in ("loop", "fold"):  # the backbone's batch of tasks: one by one or as one
            self.algo.backbone.fold_tasks = mode == "fold"
        self.optimizer, _ = build_optimizer(cfg, self.algo.parameters())
        self.compiled = cfg.device.compile

    def step(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        self.algo.meta_step(batch)
        self.optimizer.step()


# ------------------------------------------------------------------ measurements


def make_sync(device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def reference_grads(ref: Reference, batch) -> dict:
    """The reference's meta-gradient on ``batch``, by reference parameter name (Meta-SGD's rates included)."""
    ref.net.zero_grad(set_to_none=True)
    ref.meta_step(batch)
    grads = ref.grads()
    if ref.rates:
        grads.update({k: r.grad for k, r in ref.rates.items()})
    return grads


def float64_reference(engine: Engine, a, device) -> Reference:
    ref = Reference(engine.algo, a, device)
    ref.net.double()
    if ref.rates:
        ref.rates = {k: r.detach().double().requires_grad_() for k, r in ref.rates.items()}
    return ref


def engine_grads(algo, batch) -> dict:
    """The engine's meta-gradient on ``batch``, by reference parameter name (Meta-SGD's rates included)."""
    algo.zero_grad(set_to_none=True)
    algo.meta_step(batch)
    got = {ref_name(k): p.grad.clone() for k, p in algo.named_parameters() if not k.startswith("inner_lrs")}
    if hasattr(algo, "inner_lrs"):
        got.update({ref_name("net." + k): r.grad.clone() for (k, _), r in zip(algo.net.named_parameters(), algo.inner_lrs)})
    algo.zero_grad(set_to_none=True)
    return got


def as_float64(batch) -> TaskBatch:
    f = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    return TaskBatch(*(f(getattr(batch, n)) for n in ("support_x", "support_y", "query_x", "query_y", "classes")))


def tasks_of(batch, i: int, j: int) -> TaskBatch:
    return TaskBatch(*(getattr(batch, n)[i:j] for n in ("support_x", "support_y", "query_x", "query_y", "classes")))


def off(grads: dict, target: dict) -> float:
    """Max abs difference over all tensors, relative to the target's largest entry: conv biases before
    BatchNorm have gradients that are zero up to rounding, so entry-wise ratios would mean nothing."""
    scale = max(t.abs().max().item() for t in target.values())
    return max((grads[k].double() - target[k]).abs().max().item() for k in target) / scale


def same_decisions(engine: Engine, a, batch, chunk: int = 4) -> dict:
    """Each side's float32 meta-gradient against float64 *with its own max-pool and ReLU decisions*
    (ops.Decisions: recorded in float32, replayed in float64): rounding alone, without the flips that
    near-ties add (a flip moves a whole pixel's gradient, comes and goes with the data, and dwarfs the
    rounding). Also the flips counted and the mean perturbation of the values the decisions are taken on.
    ``chunk`` tasks at a time (the recorded activations are kept); the meta-gradient is their weighted sum."""
    device = batch.support_x.device
    algo64 = copy.deepcopy(engine.algo).double()
    result = {}
    for side in ("engine", "reference"):
        got, truth, flips, perturbation, n = {}, {}, 0, 0.0, batch.num_tasks
        for i in range(0, n, chunk):
            part = tasks_of(batch, i, i + chunk)
            w = part.num_tasks / n
            with ops.Decisions("record") as record:
                if side == "engine":
                    g32 = engine_grads(engine.algo, part)
                else:
                    ref = Reference(engine.algo, a, device)
                    ref.net.block_end = ops.pool_relu
                    g32 = reference_grads(ref, part)
            with record.replay() as replay:
                if side == "engine":
                    g64 = engine_grads(algo64, as_float64(part))
                else:
                    ref64 = float64_reference(engine, a, device)
                    ref64.net.block_end = ops.pool_relu
                    g64 = reference_grads(ref64, as_float64(part))
            for k in g64:
                got[k] = got.get(k, 0) + w * g32[k].double()
                truth[k] = truth.get(k, 0) + w * g64[k]
            flips += replay.flips
            perturbation += w * replay.perturbation
            del record, replay
        result[side] = {"vs_float64": off(got, truth), "flips": flips, "perturbation": perturbation}
    return {"engine_vs_float64_same_decisions": result["engine"]["vs_float64"],
            "reference_vs_float64_same_decisions": result["reference"]["vs_float64"],
            "decision_flips": {"engine": result["engine"]["flips"], "reference": result["reference"]["flips"]},
            "decision_perturbation": {"engine": result["engine"]["perturbation"],
                                      "reference": result["reference"]["perturbation"]}}


def gradient_agreement(engine: Engine, a, batch) -> dict:
    """Engine vs reference meta-gradient from the same weights on the same batch, and each of them
    against the reference computed in float64 (the float32 rounding error of either side), plainly
    and with each side's own max-pool and ReLU decisions (``same_decisions``)."""
    device = batch.support_x.device
    got = engine_grads(engine.algo, batch)
    want = reference_grads(Reference(engine.algo, a, device), batch)
    truth = reference_grads(float64_reference(engine, a, device), as_float64(batch))
    scale = max(w.abs().max().item() for w in want.values())
    worst = max(want, key=lambda k: (got[k].double() - want[k].double()).abs().max().item())
    max_abs = (got[worst].double() - want[worst].double()).abs().max().item()
    return {"max_abs_diff": max_abs, "max_rel_diff": max_abs / scale, "largest_gradient": scale, "worst_tensor": worst,
            # relative to the largest entry, as above; float32 rounding, each side against float64
            "engine_vs_float64": off(got, truth), "reference_vs_float64": off(want, truth),
            # a compiled graph cannot record or replay the decisions, nor be copied into float64
            **({} if engine.compiled else same_decisions(engine, a, batch))}


def time_alternating(sides: dict, batches: list, warmup: int, repeats: int, sync) -> dict[str, list[float]]:
    """Run every side on the same batches, A/B/A/B..., and return the seconds of each timed step."""
    for i in range(warmup):
        for side in sides.values():
            side.step(batches[i % len(batches)])
    times = {name: [] for name in sides}
    for r in range(repeats):
        batch = batches[(warmup + r) % len(batches)]
        for name, side in sides.items():
            sync()
            t = time.perf_counter()
            side.step(batch)
            sync()
            times[name].append(time.perf_counter() - t)
    return times


def peak_rss_kib(reset: bool = False) -> int:
    """This process's peak resident set (KiB); ``reset`` first lowers it to the current RSS (Linux >= 4.0:
    ``/proc/self/clear_refs``), so the peak of what follows is not hidden by an earlier one (data loading)."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; cannot be reset


def memory_child(a, side: str) -> None:
    """Subprocess body: two steps of one side; print its peak memory growth over them in MiB."""
    if a.host_memory != "system":
        retain_freed_memory()
    device = resolve_device(a.device)
    stores = load_data(engine_config(a, None), device)
    sampler = stores["train"].sampler(a.ways, a.shots, a.queries, a.meta_batch_size, seed=0, training=True)
    batches = [sampler.sample() for _ in range(2)]
    engine = Engine(a, side.split(":", 1)[1] if side.startswith("engine:") else None, stores, device)
    runner = Reference(engine.algo, a, device) if side == "reference" else engine
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_kib(reset=True)
    for batch in batches:
        runner.step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (peak_rss_kib() - base) / 2**10
    print(json.dumps({"peak_mib": peak}))


def measure_memory(argv: list[str], side: str) -> float | None:
    """Run ``memory_child`` for ``side`` in a fresh process (peak RSS cannot be reset in-process)."""
    proc = subprocess.run([sys.executable, __file__, *argv, "--memory-child", side], capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", default="maml")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--meta-batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--first-order", action="store_true")
    p.add_argument("--batched", default="auto",
                   help="comma-separated algo.batched values to time, each against the reference (maml, metasgd); "
                        "MODE:N also sets algo.task_chunk=N, MODE+ckpt algo.checkpoint_inner=true, a last +fast "
                        "device.cpu_kernels=fast, a last +compile device.compile=true, e.g. auto,auto+fast,loop,fold:4,fold:16,"
                        "loop+ckpt,loop+compile (protonet: loop,fold)")
    p.add_argument("--task-chunk", type=int, default=0, help="algo.task_chunk (0: the algorithm's automatic choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--host-memory", choices=["system", "retain", "both"], default="both",
                   help="CPU malloc: glibc's default (system), freed memory kept for reuse as metalearn runs "
                        "(retain), or both phases in turn; the figures of 'sides' are from the last phase")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.memory_child:
        return memory_child(a, a.memory_child)
    argv = sys.argv[1:]

    device = resolve_device(a.device)
    sync = make_sync(device)
    modes = a.batched.split(",") if a.algo in BATCHED_ALGOS else [None]
    torch.manual_seed(0)
    stores = load_data(engine_config(a, None), device)
    sampler = stores["train"].sampler(a.ways, a.shots, a.queries, a.meta_batch_size, seed=0, training=True)
    batches = [sampler.sample() for _ in range(max(2, a.warmup + a.repeats))]
    engines = {f"engine:{m}" if m else "engine": Engine(a, m, stores, device) for m in modes}
    first = next(iter(engines.values()))
    reference = Reference(first.algo, a, device)

    agreement = {name: gradient_agreement(e, a, batches[0]) for name, e in engines.items()} \
        if a.algo in BATCHED_ALGOS else {}
    # Phase "system": glibc's default malloc, as a plain script runs. Phase "retain": freed memory kept
    # for reuse, as `metalearn` runs (metalearn/hostmem.py); a process setting, so both sides get it.
    phases = {"system": "system", "retain": "retain", "both": "system,retain"}[a.host_memory].split(",")
    phase_times = {}
    for phase in phases:
        if phase == "retain" and not retain_freed_memory():
            print("bench: cannot retain freed memory here (not glibc, or METALEARN_RETAIN_HOST_MEMORY=0)", file=sys.stderr)
            continue
        phase_times[phase] = time_alternating({"reference": reference, **engines}, batches, a.warmup, a.repeats, sync)
    last = list(phase_times)[-1]
    times = phase_times[last]
    med = {name: statistics.median(v) for name, v in times.items()}

    sample_times = []
    for _ in range(20):
        sync()
        t = time.perf_counter()
        sampler.sample()
        sync()
        sample_times.append(time.perf_counter() - t)
    sample_med = statistics.median(sample_times)

    memory = {} if a.no_memory else {name: measure_memory(argv, name) for name in ["reference", *engines]}
    result = {
        "algo": a.algo, "first_order": a.first_order, "inner_steps": a.inner_steps, "ways": a.ways, "shots": a.shots,
        "queries": a.queries, "meta_batch_size": a.meta_batch_size, "hidden": a.hidden, "task_chunk": a.task_chunk,
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "warmup": a.warmup, "repeats": a.repeats,
        "sides": {
            name: {
                "seconds_per_step": {"median": med[name], "min": min(times[name]), "max": max(times[name])},
                "tasks_per_second": a.meta_batch_size / med[name],
                "speedup_vs_reference": med["reference"] / med[name],
                "peak_memory_mib": memory.get(name),
                **({"gradient_vs_reference": agreement[name]} if name in agreement else {}),
            } for name in times
        },
        "host_memory": last,
        "phases": {phase: {name: statistics.median(v) for name, v in t.items()} for phase, t in phase_times.items()},
        **({"metalearn_vs_plain_script": {  # a plain script's loop (default malloc) against metalearn's process
            name: statistics.median(phase_times["system"]["reference"]) / med[name] for name in engines}}
           if {"system", "retain"} <= phase_times.keys() else {}),
        "sampler": {"seconds_per_batch": sample_med, "episodes_per_second": a.meta_batch_size / sample_med,
                    "share_of_engine_step": sample_med / min(med[name] for name in engines)},
        "memory_note": ("growth of peak RSS over 2 steps, one subprocess per side" if device.type == "cpu"
                        else "torch.cuda.max_memory_allocated over 2 steps"),
    }
    print(json.dumps(result, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
