"""``metalearn report <run or sweep dir>``: compare finished runs in a table and a plot.

Reads every run below a directory (a folder holding ``results.json`` and/or
``.hydra/config.yaml``): its resolved config, its command-line overrides, its
test results and its TensorBoard scalars. Runs whose configs differ only in
``seed`` (and run-local keys such as ``device`` or ``resume``) form one
configuration; the keys whose values differ between configurations are the
table's columns. Writes ``report.md``, ``report.csv`` and one PNG per
validation metric (``val_<metric>.png``), each atomically.

Statistics per configuration (test metric of each run's best-validation checkpoint):

- ``test_mean``: mean over the seeds (runs) of the configuration;
- ``test_ci95_episodes``: mean of the runs' own 95% CIs over their test episodes
  (1.96 std / sqrt(episodes), the number few-shot papers print); for one seed it
  is that run's CI. It measures episode sampling, not training randomness;
- ``test_std_seeds``: sample standard deviation over seeds (n - 1), the spread
  that training randomness causes, with ``test_min`` / ``test_max``;
- ``test_ci95_seeds``: Student-t 95% interval half-width of the mean over seeds,
  t(0.975, n - 1) * std / sqrt(n): the uncertainty of ``test_mean`` as an estimate
  of what this configuration gives over training seeds (wide for 2-3 seeds, as it should be).

Everything is computed before anything is written, so a report either appears whole or not at all.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metalearn.errors import ConfigError

#: Keys that do not change what a run computes (or tell runs of one configuration apart): never columns,
#: never part of a configuration's identity. ``seed`` is aggregated over; ``paper`` is a preset's published
#: figure (``metalearn reproduce``), a description.
RUN_LOCAL = ("seed", "resume", "device", "data.root", "data.cache_dir", "data.download", "trainer.progress", "trainer.stop_at",
             "eval.batch_size", "paper")
#: Shown in the "same in every run" line when they are not swept.
SUMMARY_KEYS = ("algo.name", "data.name", "backbone.name", "ways", "shots", "queries", "meta_batch_size", "steps",
                "optim.lr")
LOWER_IS_BETTER = {"mse", "loss"}
MISSING = "-"  # a key a run's config does not have (e.g. algo.inner_lr of protonet)


@dataclass
class Run:
    path: Path
    name: str                      # relative to the report's directory
    config: dict[str, Any]         # flattened, resolved ``.hydra/config.yaml`` ({} if absent)
    overrides: dict[str, str]      # ``.hydra/overrides.yaml`` as key -> value
    results: dict | None           # ``results.json``; None: unfinished, failed or unreadable
    problem: str | None = None     # why there are no results
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    follows: dict[str, str] = field(default_factory=dict)  # key -> the key it copies (eval.shots: ${shots})

    @property
    def seed(self) -> Any:
        return self.config.get("seed", MISSING)

    @property
    def metric(self) -> str | None:
        """The run's primary metric (what picked its best checkpoint): ``accuracy``, ``mse`` ..."""
        if self.results is not None:
            return self.results.get("best_val", {}).get("metric") or next(iter(self.results["test"]))
        for tag in self.scalars:
            if tag.startswith("val/best_"):
                return tag.removeprefix("val/best_")
        return None

    @property
    def test(self) -> dict[str, float] | None:
        return self.results["test"][self.metric] if self.results is not None else None


@dataclass
class Configuration:
    values: dict[str, Any]         # swept key -> value
    runs: list[Run]                # every run, finished or not, in directory order

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.results is not None]

    @property
    def unfinished(self) -> list[Run]:
        return [r for r in self.runs if r.results is None]


@dataclass
class Report:
    root: Path
    runs: list[Run]
    keys: list[str]                # the swept keys (columns), in override order
    configurations: list[Configuration]
    common: dict[str, Any]         # SUMMARY_KEYS that are the same in every run


# ---------------------------------------------------------------- reading runs


def is_run(path: Path) -> bool:
    return (path / "results.json").is_file() or (path / ".hydra" / "config.yaml").is_file()


def _natural(text: str) -> list:
    """Sort key that puts ``10_...`` after ``9_...``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def find_runs(root: Path) -> list[Path]:
    """``root`` itself if it is a run, else every run folder below it (a run's own sub-folders are not searched)."""
    root = Path(root)
    if is_run(root):
        return [root]
    found, seen = [], set()
    # Symlinked runs (a folder of links to runs gathered from elsewhere) count; each real folder once (no loops).
    for folder, subfolders, _ in os.walk(root, followlinks=True):
        here, real = Path(folder), os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        if here != root and is_run(here):
            found.append(here)
            subfolders.clear()
            continue
        subfolders[:] = [s for s in subfolders if not s.startswith(".")]
    return sorted(found, key=lambda p: _natural(str(p.relative_to(root))))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become tuples (hashable, comparable)."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list):
        tree = tuple(tree)
    return {prefix.rstrip("."): tree}


def read_config(run_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The run's config, flattened and resolved, and which keys are plain copies of another (``${key}``)."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}, {}
    cfg = OmegaConf.load(path)
    stored = OmegaConf.to_container(cfg, resolve=False)
    from metalearn.renamed import migrate

    if migrate(stored):  # a run recorded before the data split keys were renamed: compared under the new ones
        cfg = OmegaConf.create(stored)
    raw = flatten(OmegaConf.to_container(cfg, resolve=False))
    follows = {k: v[2:-1] for k, v in raw.items() if isinstance(v, str) and re.fullmatch(r"\$\{[\w.]+\}", v)}
    try:
        return flatten(OmegaConf.to_container(cfg, resolve=True)), follows  # eval.shots: ${shots} -> the number
    except Exception:  # an interpolation that cannot resolve here: compare the raw text
        return raw, follows


def read_overrides(run_dir: Path) -> dict[str, str]:
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    out = {}
    for line in OmegaConf.to_container(OmegaConf.load(path)) or []:
        key, _, value = str(line).partition("=")
        out[key.lstrip("+~")] = value
    return out


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of the run as ``tag -> [(step, value), ...]``.

    The accumulator reads all event files of the folder in order and drops what a crashed run
    logged after the step it resumed from (the ``purge_step`` the engine writes on resume).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir()):
        return {}
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 1, "histograms": 1, "images": 1,
                                                        "audio": 1, "compressedHistograms": 1})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_run(run_dir: Path, root: Path) -> Run:
    name = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
    problem = None
    try:
        config, follows = read_config(run_dir)
        overrides = read_overrides(run_dir)
    except Exception as e:  # a hand-edited or truncated YAML: list the run, say why
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        config, follows, overrides, problem = {}, {}, {}, f"unreadable .hydra/ files ({reason})"
    scalars = read_scalars(run_dir)
    results = None
    path = run_dir / "results.json"
    if path.is_file():
        try:
            results = json.loads(path.read_text())
            if not isinstance(results.get("test"), dict) or not results["test"]:
                raise ValueError("no 'test' metrics")
        except (ValueError, AttributeError) as e:
            results, problem = None, f"unreadable results.json ({str(e).splitlines()[0]})"
        else:
            # steps may have been raised on resume; results.json holds what the run trained for
            if "steps" in results and config:
                config["steps"] = results["steps"]
    elif problem is None and (run_dir / "failed.json").is_file():  # a failed sweep job's reason (metalearn/sweeps.py)
        try:
            problem = "failed: " + str(json.loads((run_dir / "failed.json").read_text())["error"])
        except (ValueError, KeyError, TypeError):
            problem = "failed (unreadable failed.json)"
    elif problem is None:
        logged = max((s for tag, v in scalars.items() if tag.startswith("train/") for s, _ in v), default=None)
        total = config.get("steps")
        where = "nothing logged" if not logged else \
            f"last logged step {logged}" + (f" of {total}" if total is not None else "")
        problem = f"no results.json: unfinished or failed ({where})"
    return Run(run_dir, name, config, overrides, results, problem, scalars, follows)


# ---------------------------------------------------------------- grouping


#: Keys below a run-local one that do change the numbers: a configuration's own.
NOT_RUN_LOCAL = ("device.precision",)


def _is_run_local(key: str) -> bool:
    return key not in NOT_RUN_LOCAL and any(key == k or key.startswith(k + ".") for k in RUN_LOCAL)


def _values(runs: list[Run], key: str) -> list[Any]:
    """A key's value in each run: from its config, else from its overrides (``experiment``), else MISSING."""
    return [r.config.get(key, r.overrides.get(key, MISSING)) for r in runs]


def swept_keys(runs: list[Run]) -> list[str]:
    """The keys whose values differ across runs, seed and run-local keys excluded.

    Order: the order of the runs' command-line overrides, then config order. A key is left out when
    it copies another swept key in every run (``eval.shots: ${shots}``), and a group's own
    keys (``algo.inner_lr``) are left out where they only differ because the group does
    (``algo.name``), i.e. they are constant among the runs of each group choice.
    """
    order: list[str] = []
    config_keys = _config_keys(runs)
    for r in runs:
        for key in [*(_config_key(k, config_keys) for k in r.overrides), *r.config]:
            if key not in order:
                order.append(key)
    varying = [k for k in order if not _is_run_local(k) and len(set(map(_hashable, _values(runs, k)))) > 1]
    kept: list[str] = []
    for key in varying:
        group = key.split(".", 1)[0]
        if "." in key and f"{group}.name" in varying and key != f"{group}.name":
            by_choice: dict[Any, set] = {}
            for choice, value in zip(_values(runs, f"{group}.name"), _values(runs, key)):
                by_choice.setdefault(choice, set()).add(_hashable(value))
            if all(len(v) == 1 for v in by_choice.values()):
                continue
        targets = {r.follows.get(key) for r in runs}
        if len(targets) == 1 and (target := targets.pop()) is not None and target in varying:
            continue
        kept.append(key)
    return kept


def _config_key(override_key: str, keys: set[str]) -> str:
    """The config key an override sets: ``algo`` (a group choice) -> ``algo.name``; ``experiment``
    (a preset, not in the config) stays ``experiment``."""
    if override_key not in keys and f"{override_key}.name" in keys:
        return f"{override_key}.name"
    return override_key


def _config_keys(runs: list[Run]) -> set[str]:
    return {k for r in runs for k in r.config}


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def identity(run: Run) -> tuple:
    """What makes a configuration: every config key but the run-local ones, and overrides that the
    config does not record (``experiment=<preset>``)."""
    items = {k: v for k, v in run.config.items() if not _is_run_local(k)}
    items.update({k: v for k, v in run.overrides.items() if not _is_run_local(k) and k not in run.config
                  and not any(c.startswith(k + ".") for c in run.config)})
    return tuple(sorted((k, _hashable(v)) for k, v in items.items()))


def group_runs(runs: list[Run], keys: list[str]) -> list[Configuration]:
    """Runs with the same identity form one configuration, in the order of their first run."""
    groups: dict[tuple, Configuration] = {}
    for run in runs:
        ident = identity(run) if (run.config or run.overrides) else ("run", run.name)
        if ident not in groups:
            groups[ident] = Configuration({k: _values([run], k)[0] for k in keys}, [])
        groups[ident].runs.append(run)
    return list(groups.values())


def build_report(root: str | os.PathLike) -> Report:
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"no such directory: {root}; give a run directory or a sweep directory "
                          "(outputs/<date>/<time> or outputs/multirun/<date>/<time>)")
    if not root.is_dir():
        raise ConfigError(f"{root} is a file; give a run directory or a sweep directory "
                          "(outputs/<date>/<time> or outputs/multirun/<date>/<time>)")
    paths = find_runs(root)
    if not paths:
        raise ConfigError(f"no runs under {root} (no folder there holds results.json or .hydra/config.yaml); "
                          "give a run or sweep directory that 'metalearn train' wrote")
    runs = [read_run(p, root) for p in paths]
    keys = swept_keys(runs)
    configurations = group_runs(runs, keys)
    common = {}
    for key in SUMMARY_KEYS:
        values = set(map(_hashable, _values(runs, key)))
        if key not in keys and len(values) == 1 and MISSING not in values:
            common[key] = values.pop()
    return Report(root, runs, keys, configurations, common)


# ---------------------------------------------------------------- statistics


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on its CDF, Simpson's rule)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float) -> float:  # P(T <= t) for t >= 0: 1/2 + the integral of the density from 0 to t
        n = 2000
        h = t / n
        total = 0.0
        for i in range(n + 1):
            x = i * h
            w = 1 if i in (0, n) else (4 if i % 2 else 2)
            total += w * math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))
        return 0.5 + total * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def summarize(configuration: Configuration) -> dict[str, Any]:
    """The test statistics of a configuration over its finished runs (see the module docstring)."""
    runs = configuration.finished
    metric = next((r.metric for r in runs or configuration.runs if r.metric), None)
    stats: dict[str, Any] = {"metric": metric, "seeds": len(runs), "seed_values": [r.seed for r in runs],
                             "per_seed": [r.test["mean"] for r in runs]}
    if not runs:
        return stats
    values = stats["per_seed"]
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    metrics = {r.metric for r in runs}
    if len(metrics) > 1:
        raise ConfigError(f"the runs {', '.join(r.name for r in runs)} have one configuration but report different "
                          f"metrics ({', '.join(sorted(metrics))}); report them separately")
    stats.update({
        "mean": mean,
        "ci95_episodes": sum(r.test["ci95"] for r in runs) / n,
        "std_seeds": std,
        "min": min(values),
        "max": max(values),
        "ci95_seeds": t_quantile(0.975, n - 1) * std / math.sqrt(n) if n > 1 else None,
        "episodes": sorted({r.test.get("episodes") for r in runs}),
        "best_val": sum(r.results["best_val"]["value"] for r in runs) / n if all(
            r.results.get("best_val", {}).get("value") is not None for r in runs) else None,
    })
    return stats


# ---------------------------------------------------------------- formatting


def column_name(key: str) -> str:
    """``algo.name`` -> ``algo`` (the override users type), other keys as they are."""
    return key.removesuffix(".name") if key.count(".") == 1 and key.endswith(".name") else key


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(_show, value)) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _scale(metric: str | None) -> tuple[float, str]:
    """Accuracy shows in percent; other metrics as they are."""
    return (100.0, " (%)") if metric == "accuracy" else (1.0, "")


def _num(value: float | None, metric: str | None) -> str:
    if value is None:
        return ""
    scale, _ = _scale(metric)
    return f"{value * scale:.2f}" if metric == "accuracy" else f"{value:.4g}"


def markdown(report: Report, plots: list[str]) -> tuple[str, str]:
    """``(table, document)``: the configuration table alone (printed), and the whole report.md."""
    stats = [summarize(c) for c in report.configurations]
    metrics = sorted({s["metric"] for s in stats if s["metric"]})
    single = metrics[0] if len(metrics) == 1 else None
    key_columns = report.keys or [k for k in ("algo.name", "data.name") if any(k in r.config for r in report.runs)]
    header = [column_name(k) for k in key_columns]
    if single is None:
        header.append("metric")
    unit = _scale(single)[1] if single else ""
    header += ["seeds", f"test {single or 'metric'}{unit}", "seed std", "95% CI over seeds"]
    rows = []
    for c, s in zip(report.configurations, stats):
        row = [_show(_values(c.runs[:1], k)[0]) for k in key_columns]
        if single is None:
            row.append(s["metric"] or "")
        seeds = str(s["seeds"])
        if 1 < s["seeds"] <= 6:
            seeds += f" ({', '.join(map(_show, s['seed_values']))})"
        if c.unfinished:
            seeds += f", {len(c.unfinished)} unfinished"
        if s["seeds"]:
            m = s["metric"]
            row += [seeds, f"{_num(s['mean'], m)} ± {_num(s['ci95_episodes'], m)}", _num(s["std_seeds"], m),
                    f"± {_num(s['ci95_seeds'], m)}" if s["ci95_seeds"] is not None else ""]
        else:
            row += [seeds, "no finished run", "", ""]
        rows.append(row)
    table = _md_table(header, rows)

    lines = [f"# metalearn report: {report.root}", ""]
    finished = sum(r.results is not None for r in report.runs)
    lines.append(f"{len(report.runs)} runs ({finished} finished) in {len(report.configurations)} configurations.")
    episode = _common_episode(report.runs)
    if single:
        better = "lower" if single in LOWER_IS_BETTER else "higher"
        lines.append(f"Test {single} ({better} is better) of each run's best-validation checkpoint"
                     + (f" on {episode}" if episode else "") + ".")
    if report.common:
        shared = ", ".join(f"{column_name(k)}={_show(v)}" for k, v in report.common.items())
        lines.append(f"Same in every run: {shared}.")
    lines += ["", table, "",
              "Columns: *seeds*: finished runs (their seeds); *test*: mean over seeds ± the 95% CI over test episodes "
              "(1.96 std / sqrt(episodes) of each run, averaged over its seeds: the interval papers print; "
              "for one seed, the run's own); *seed std*: standard deviation over seeds (n - 1); *95% CI over seeds*: Student-t "
              "interval of the mean over seeds, t(0.975, n - 1) std / sqrt(n)."]
    lines += ["", "## Runs", ""]
    run_header = ["run", *[column_name(k) for k in report.keys], "seed", f"test{unit}" if single else "test",
                  "best val (step)", "status"]
    run_rows = []
    for c in report.configurations:
        for r in c.runs:
            m = r.metric
            test = f"{_num(r.test['mean'], m)} ± {_num(r.test['ci95'], m)}" if r.test else ""
            best = r.results.get("best_val", {}) if r.results else {}
            best_text = f"{_num(best['value'], m)} ({best.get('step')})" if best.get("value") is not None else ""
            run_rows.append([r.name, *[_show(_values([r], k)[0]) for k in report.keys], _show(r.seed), test, best_text,
                             "finished" if r.results is not None else r.problem])
    lines += [_md_table(run_header, run_rows)]
    for plot in plots:
        lines += ["", f"![{plot}]({plot})"]
    return table, "\n".join(lines) + "\n"


def _common_episode(runs: list[Run]) -> str | None:
    """The test episodes, as far as every finished run shares them (``20 fixed test episodes (5-way, ...)``)."""
    done = [r for r in runs if r.results is not None]
    counts = {r.test.get("episodes") for r in done}
    if len(counts) != 1 or None in counts:
        return None
    shape = {}
    for key in ("task", "ways", "shots", "queries"):
        values = {(r.results.get("episode") or {}).get(key) for r in done}
        if len(values) == 1 and None not in values:
            shape[key] = values.pop()
    regression, rl = shape.get("task") == "regression", shape.get("task") == "reinforcement"
    way_shot = " ".join(x for x in (f"{shape['ways']}-way" if "ways" in shape and not (regression or rl) else "",
                                     f"{shape['shots']}-shot" if "shots" in shape else "") if x)
    queries_are = "query points" if regression else "episodes after adaptation" if rl else "queries per class"
    queries = f"{shape['queries']} {queries_are}" if "queries" in shape else ""
    parts = [way_shot, queries]
    described = ", ".join(p for p in parts if p)
    what = "tasks" if regression or rl else "episodes"
    return f"{counts.pop()} fixed test {what}" + (f" ({described})" if described else "")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    out = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(out)


CSV_STATS = ["metric", "seeds", "seed_values", "test_mean", "test_ci95_episodes", "test_std_seeds", "test_min",
             "test_max", "test_ci95_seeds", "per_seed", "test_episodes", "best_val_mean", "unfinished", "runs"]


def csv_text(report: Report) -> str:
    """One row per configuration: the swept keys, then the statistics (raw numbers, full precision)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([column_name(k) for k in report.keys] + CSV_STATS)
    for c in report.configurations:
        s = summarize(c)

        def num(key: str) -> str:
            return "" if s.get(key) is None else repr(s[key])

        writer.writerow([_show(_values(c.runs[:1], k)[0]) for k in report.keys] + [
            s["metric"] or "", s["seeds"], ";".join(map(_show, s["seed_values"])), num("mean"), num("ci95_episodes"),
            num("std_seeds"), num("min"), num("max"), num("ci95_seeds"), ";".join(map(repr, s["per_seed"])),
            ";".join(map(str, s.get("episodes", []))), num("best_val"), len(c.unfinished),
            ";".join(r.name for r in c.runs)])
    return buffer.getvalue()


# ---------------------------------------------------------------- plots


def label(c: Configuration) -> str:
    text = ", ".join(f"{column_name(k)}={_show(v)}" for k, v in c.values.items()) or "all runs"
    n = len(c.finished)
    return f"{text} ({n} seed{'s' if n != 1 else ''})" if n else f"{text} (unfinished)"


def plot_png(report: Report, metric: str) -> bytes | None:
    """Validation ``metric`` over steps, one line per configuration: the mean over its finished runs
    at each validation step, shaded from the lowest to the highest run. A configuration without a
    finished run is drawn dashed from its unfinished ones. None if no run logged ``val/<metric>``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("the plots need matplotlib: pip install matplotlib") from None
    tag = f"val/{metric}"
    scale, unit = _scale(metric)
    fig = Figure(figsize=(7.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = 0
    for c in report.configurations:
        runs = [r for r in (c.finished or c.unfinished) if r.metric == metric and r.scalars.get(tag)]
        if not runs:
            continue
        by_step: dict[int, list[float]] = {}
        for r in runs:
            for step, value in r.scalars[tag]:
                by_step.setdefault(step, []).append(value * scale)
        steps = sorted(by_step)
        mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
        line, = ax.plot(steps, mean, marker="o", markersize=3, label=label(c),
                        linestyle="-" if c.finished else "--")
        if len(runs) > 1:
            ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        drawn += 1
    if not drawn:
        return None
    if metric in LOWER_IS_BETTER and all(v > 0 for c in report.configurations for r in c.runs
                                         for _, v in r.scalars.get(tag, [])):
        ax.set_yscale("log")
    ax.set_xlabel("meta-training step")
    ax.set_ylabel(f"validation {metric}{unit}")
    ax.set_title(f"validation {metric}: mean over seeds, band from lowest to highest seed", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# ---------------------------------------------------------------- the command


def write_report(root: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[str, list[Path]]:
    """Build the report of the runs under ``root`` and write it to ``out`` (default: ``root``).

    Returns the Markdown table (for printing) and the files written.
    """
    report = build_report(root)
    from metalearn.fileio import atomic_path  # imports torch: only once there is something to write

    out = Path(out) if out is not None else report.root
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    metrics = sorted({r.metric for r in report.runs if r.metric})
    pngs = {f"val_{m}.png": png for m in metrics if (png := plot_png(report, m)) is not None}
    table, document = markdown(report, list(pngs))
    files = {"report.md": document.encode(), "report.csv": csv_text(report).encode(), **pngs}
    written = []
    for name, data in files.items():
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(data)
        written.append(out / name)
    unfinished = [r for r in report.runs if r.results is None]
    notes = [f"{r.name}: {r.problem}" for r in unfinished]
    return table + ("\n\nnot in the statistics:\n" + "\n".join(f"  {n}" for n in notes) if notes else ""), written


def report_command(args: list[str]) -> int:
    """``metalearn report <run or sweep dir> [--out DIR]``; a usage mistake raises ConfigError (one line, from cli)."""
    usage = "usage: metalearn report <run or sweep dir> [--out DIR]"
    if any(a in ("-h", "--help") for a in args):
        print(f"{usage}\n\nCompares the runs below a directory: writes report.md, report.csv and val_<metric>.png "
              "(into the directory, or --out DIR)\nand prints the table. Runs differing only in seed are one row.")
        return 0
    paths, out, rest = [], None, list(args)
    while rest:
        a = rest.pop(0)
        if a == "--out" or a.startswith("--out="):
            value = a.split("=", 1)[1] if "=" in a else (rest.pop(0) if rest else None)
            if not value:
                raise ConfigError(f"--out needs a directory; {usage}")
            out = value
        elif a.startswith("-"):
            raise ConfigError(f"unknown option {a!r}; {usage}")
        elif re.match(r"[A-Za-z_][\w.]*=", a) and "/" not in a and not Path(a).exists():  # Hydra habit: dir=...
            raise ConfigError(f"no such directory {a!r}; report takes the directory itself, not key=value; {usage}")
        else:
            paths.append(a)
    if len(paths) != 1:
        raise ConfigError(f"give one run or sweep directory; {usage}")
    try:
        table, written = write_report(paths[0], out)
    except PermissionError as e:  # a read-only sweep directory (someone else's, a shared archive)
        raise ConfigError(f"cannot write the report: {e.strerror}: {e.filename}; write it elsewhere with --out DIR")
    print(table)
    print("\nwrote: " + ", ".join(str(p) for p in written))
    return 0
