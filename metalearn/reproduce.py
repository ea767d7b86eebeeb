"""``metalearn reproduce``: each paper preset's published figure beside what it measures here.

Two ways in:

- ``metalearn reproduce experiment=<preset>[,<preset>...] [key=value ...] [--out DIR]`` trains the presets
  (a Hydra sweep over ``experiment=`` through the train app, in this process: one run directory per preset,
  ``<out>/<preset>/``; ``out`` defaults to ``outputs/reproduce/<date>/<time>``), then writes the table of every
  preset run under ``<out>``. The overrides apply to every preset (``steps=500 data=omniglot_small``). Running
  the same command again with the same ``--out`` continues stopped runs and skips finished ones (sweep jobs do).
- ``metalearn reproduce --from DIR [experiment=<preset>,...] [--out DIR]`` reads the runs below ``DIR``
  (``metalearn train`` or ``reproduce`` wrote them); a run belongs to the preset Hydra recorded for it
  (``.hydra/hydra.yaml``: ``runtime.choices.experiment``). Runs of one preset whose configs differ only in
  seed (or run-local keys, as in ``metalearn report``) are one row, their seeds averaged.

The table, ``reproduce.md`` and ``reproduce.csv`` (each written atomically, into ``--out`` or ``DIR``):

- **paper**: the preset's ``paper:`` section (``conf/experiment/<preset>.yaml``, as the file says now): the
  figure, its 95% CI half-width where the paper prints one, its source and the paper's protocol;
- **measured**: the test ``paper.metric`` of the run's best-validation checkpoint (``results.json``), mean over
  seeds +- the 95% CI over test episodes (1.96 std / sqrt(episodes), averaged over seeds): sampling of test
  episodes only, not training randomness;
- **Delta/CI** = (measured - paper) / sqrt(ci_paper^2 + ci_measured^2), with ci_paper = 0 where the paper prints
  no 95% CI. Both are 1.96-sigma half-widths, so |Delta/CI| > 1 means the two differ at about the 5% level
  (two-sided); the sign is measured minus paper (for an error such as MSE, > 0 is worse than the paper);
- **proxy**: ``no`` when the run is its preset as the file defines it; otherwise ``yes`` and every key where
  the run differs (``data=omniglot_small (preset: omniglot)``, ``steps=500 (preset: 20000)``): such a row is
  a reduced-data or reduced-budget proxy, not a reproduction. Run-local keys (``seed``, ``device``,
  ``data.root``, ...) do not count.
"""

from __future__ import annotations

import csv
import datetime
import functools
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from metalearn import report
from metalearn.config import PaperConfig
from metalearn.errors import ConfigError, MetalearnError

USAGE = ("usage: metalearn reproduce experiment=<preset>[,<preset>...] [key=value ...] [--out DIR] [--config-dir DIR]\n"
         "       metalearn reproduce --from DIR [experiment=<preset>,...] [--out DIR] [--config-dir DIR]")

GROUPS = ("algo", "data", "backbone")  # config groups whose choice a run may change (device is run-local)
#: Keys that change no number of a run (how often it logs and writes last.pt): never a proxy's difference.
NEUTRAL = ("trainer.log_every", "trainer.ckpt_every")

MD_HEADER = ["preset", "dataset (as run)", "protocol (paper)", "metric", "paper", "source", "measured",
             "Δ/CI", "proxy"]
CSV_HEADER = ["preset", "dataset", "protocol", "metric", "paper_value", "paper_ci95", "paper_source", "paper_note",
              "measured_mean", "measured_ci95", "test_episodes", "seeds", "delta_ci_units", "proxy", "differences",
              "status", "runs"]


# ---------------------------------------------------------------- presets


#: ``hydra.searchpath`` overrides of this command (from ``--config-dir`` or given): the user's own presets
#: (``<dir>/experiment/*.yaml``) are presets like metalearn's.
SEARCHPATH: list[str] = []


def preset_names() -> list[str]:
    """Every ``experiment=`` preset: metalearn's and those on ``SEARCHPATH``, through Hydra's config loader."""
    return list(_preset_names(tuple(SEARCHPATH)))


@functools.lru_cache(maxsize=None)
def _preset_names(searchpath: tuple[str, ...]) -> tuple[str, ...]:
    from metalearn import confdir

    return tuple(sorted(confdir.group_options("config", list(searchpath), "experiment")))


@dataclass
class Preset:
    name: str
    paper: PaperConfig | None       # None: the file has no paper: section
    config: dict[str, Any]          # flattened, resolved, as report.read_config gives a run's
    choices: dict[str, Any]         # group -> option (data -> omniglot)


@functools.lru_cache(maxsize=None)
def preset(name: str) -> Preset:
    """The preset as its file defines it (composed now), with its checked paper section."""
    from hydra import compose
    from omegaconf import OmegaConf

    from metalearn import confdir
    from metalearn.config import paper_config

    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    with confdir.initialized():
        cfg = compose("config", overrides=[f"experiment={name}", *SEARCHPATH], return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    del cfg.hydra
    return Preset(name, paper_config(cfg), report.flatten(OmegaConf.to_container(cfg, resolve=True)), choices)


def paper_of(name: str) -> PaperConfig:
    return require_paper(preset(name))


def require_paper(p: Preset) -> PaperConfig:
    if p.paper is None:
        raise ConfigError(f"preset {p.name!r} has no paper: section (the published figure to compare with); add one "
                          "(metric, value, ci95, source, protocol, note) as conf/experiment/maml_omniglot_5w1s.yaml has")
    return p.paper


# ---------------------------------------------------------------- runs


def run_choices(run_dir: Path) -> dict[str, Any]:
    """The group choices Hydra recorded for a run (``.hydra/hydra.yaml``), {} if it has none."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return {}
    try:
        choices = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.choices")
        return OmegaConf.to_container(choices) if choices is not None else {}
    except Exception:  # a truncated or hand-edited file: fall back to the overrides
        return {}


def preset_of(run: report.Run, choices: dict[str, Any]) -> str | None:
    return choices.get("experiment") or run.overrides.get("experiment") or None


def differences(run: report.Run, choices: dict[str, Any], ref: Preset) -> list[tuple[str, Any, Any]]:
    """(key, the run's value, the preset's value) wherever the run is not its preset, run-local keys aside.
    A changed group choice is one entry (``data``), not one per key of the group."""
    changed_groups = [g for g in GROUPS if g in choices and choices.get(g) != ref.choices.get(g)]
    out = [(g, choices.get(g), ref.choices.get(g)) for g in changed_groups]
    keys = list(ref.config) + [k for k in run.config if k not in ref.config]
    for key in keys:
        if report._is_run_local(key) or key in NEUTRAL or key.split(".", 1)[0] in changed_groups:
            continue
        mine, theirs = run.config.get(key, report.MISSING), ref.config.get(key, report.MISSING)
        if report._hashable(mine) != report._hashable(theirs):
            out.append((key, mine, theirs))
    return out


@dataclass
class Row:
    preset: str
    paper: PaperConfig | None
    dataset: str
    runs: list[report.Run]
    differences: list[tuple[str, Any, Any]]
    problem: str | None = None      # why there is no measurement
    measured: dict[str, Any] = field(default_factory=dict)  # mean, ci95, episodes, seeds

    @property
    def metric(self) -> str:
        return self.paper.metric if self.paper is not None else ""

    @property
    def delta(self) -> float | None:
        """(measured - paper) / sqrt(ci_paper^2 + ci_measured^2); None where either figure is missing."""
        if self.paper is None or self.paper.value is None or not self.measured:
            return None
        scale = math.hypot(self.paper.ci95 or 0.0, self.measured["ci95"])
        return (self.measured["mean"] - self.paper.value) / scale if scale > 0 else None

    @property
    def status(self) -> str:
        unfinished = [r for r in self.runs if r.results is None]
        if self.problem:
            return self.problem
        return "finished" + (f", {len(unfinished)} unfinished" if unfinished else "")


def _dataset(run: report.Run, choices: dict[str, Any]) -> str:
    data = choices.get("data") or run.config.get("data.name", "?")
    source = run.config.get("data.source")
    return f"{data} of {source}" if source not in (None, report.MISSING) else str(data)


def build_rows(root: Path, only: list[str] | None = None) -> list[Row]:
    """One row per (preset, configuration) of the runs below ``root``, in preset order (or ``only``'s)."""
    import logging

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its event reader's INFO lines, under Hydra's logging
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"no such directory: {root}; give --from a directory that metalearn train or reproduce wrote")
    if not root.is_dir():
        raise ConfigError(f"{root} is a file; give --from a directory that metalearn train or reproduce wrote")
    paths = report.find_runs(root)
    if not paths:
        raise ConfigError(f"no runs under {root} (no folder there holds results.json or .hydra/config.yaml); "
                          "give --from a directory that metalearn train or reproduce wrote")
    groups: dict[tuple, Row] = {}
    known = set(preset_names())
    found = 0
    for path in paths:
        run = report.read_run(path, root)
        choices = run_choices(path)
        name = preset_of(run, choices)
        if name is None or (only is not None and name not in only):
            continue
        found += 1
        key = (name, report.identity(run))
        if key not in groups:
            if name not in known:
                groups[key] = Row(name, None, _dataset(run, choices), [], [],
                                  problem=f"preset {name!r} is not in conf/experiment/ (any more)")
            else:
                ref = preset(name)
                if not choices:  # no .hydra/hydra.yaml: the groups the command line chose, else the preset's
                    choices = {**ref.choices, **{g: v for g, v in run.overrides.items() if g in GROUPS}}
                groups[key] = Row(name, ref.paper, _dataset(run, choices), [], differences(run, choices, ref),
                                  problem=None if ref.paper else "the preset has no paper: section")
        groups[key].runs.append(run)
    if not found and only is None:
        runs = f"{len(paths)} run{'s' if len(paths) != 1 else ''}"
        raise ConfigError(f"none of the {runs} under {root} came from an experiment= preset; "
                          "run them with metalearn reproduce experiment=<preset> (or metalearn train experiment=...)")
    if only is not None:  # every preset named: at least one run of each
        missing = [n for n in only if not any(k[0] == n for k in groups)]
        if missing:
            raise ConfigError(f"no run of {', '.join(missing)} under {root}; run it with "
                              f"metalearn reproduce experiment={','.join(missing)}")
    rows = list(groups.values())
    order = {n: i for i, n in enumerate(only or sorted({r.preset for r in rows}))}
    rows.sort(key=lambda r: order[r.preset])  # stable: configurations of a preset in directory order
    for row in rows:
        _measure(row)
    return rows


def _measure(row: Row) -> None:
    if row.problem:
        return
    done = [r for r in row.runs if r.results is not None]
    if not done:
        row.problem = "; ".join(f"{r.name}: {r.problem}" for r in row.runs)
        return
    metric = row.metric
    lacking = [r for r in done if metric not in r.results["test"]]
    if lacking:
        has = ", ".join(lacking[0].results["test"])
        row.problem = f"{lacking[0].name}: results.json has no test metric {metric!r} (it has: {has})"
        return
    tests = [r.results["test"][metric] for r in done]
    row.measured = {"mean": sum(t["mean"] for t in tests) / len(tests),
                    "ci95": sum(t["ci95"] for t in tests) / len(tests),
                    "episodes": sorted({t.get("episodes") for t in tests if t.get("episodes") is not None}),
                    "seeds": [r.seed for r in done]}


# ---------------------------------------------------------------- the table


def _num(value: float | None, metric: str) -> str:
    if value is None:
        return ""
    return f"{100 * value:.2f}" if metric == "accuracy" else f"{value:.4f}"  # an error (MSE): 4 decimals


def _figure(value: float | None, ci95: float | None, metric: str) -> str:
    if value is None:
        return ""
    return _num(value, metric) + (f" ± {_num(ci95, metric)}" if ci95 is not None else "")


def _difference_text(differences: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k}={report._show(mine)} (preset: {report._show(theirs)})" for k, mine, theirs in differences)


def _proxy(row: Row) -> str:
    return "yes: " + _difference_text(row.differences) if row.differences else "no"


def markdown(rows: list[Row], root: Path) -> tuple[str, str]:
    """``(table, document)``: the table alone (printed) and the whole reproduce.md."""
    table_rows = []
    for row in rows:
        p, m = row.paper, row.metric
        unit = " (%)" if m == "accuracy" else ""
        paper = (_figure(p.value, p.ci95, m) or "none (see note)") if p else ""
        if row.measured:
            measured = _figure(row.measured["mean"], row.measured["ci95"], m)
            seeds = len(row.measured["seeds"])
            measured += f" ({seeds} seeds)" if seeds > 1 else ""
        else:
            measured = row.status
        delta = f"{row.delta:+.2f}" if row.delta is not None else ""
        table_rows.append([row.preset, row.dataset, p.protocol if p else "", f"{m}{unit}", paper,
                           p.source if p else "", measured, delta, _proxy(row)])
    table = report._md_table(MD_HEADER, table_rows)
    proxies = sum(bool(r.differences) for r in rows)
    lines = [f"# metalearn reproduce: {root}", "",
             f"{len(rows)} row{'s' if len(rows) != 1 else ''}, {proxies} of them reduced-data or reduced-budget "
             "proxies (proxy: yes).", "",
             table, "",
             "Columns: *paper*: the preset's published figure (± its 95% CI where the paper prints one) from "
             "`paper:` in conf/experiment/<preset>.yaml; *measured*: the test metric of each run's best-validation "
             "checkpoint, mean over seeds ± the 95% CI over test episodes (1.96 std / sqrt(episodes)); "
             "*Δ/CI*: (measured - paper) / sqrt(ci_paper² + ci_measured²), ci_paper = 0 where the paper prints no "
             "95% CI: |Δ/CI| > 1 means a difference at about the 5% level; *proxy*: yes where the run is not its "
             "preset as defined (the keys that differ, with the preset's value): a reduced-data or reduced-budget "
             "proxy, not a reproduction."]
    notes = [f"- `{r.preset}`: {r.paper.note}" for r in _unique(rows) if r.paper is not None and r.paper.note]
    if notes:
        lines += ["", "## Notes on the papers' figures", "", *notes]
    lines += ["", "## Runs", "",
              report._md_table(["preset", "run", "seed", "status"],
                               [[row.preset, r.name, report._show(r.seed), "finished" if r.results is not None
                                 else r.problem or ""] for row in rows for r in row.runs])]
    return table, "\n".join(lines) + "\n"


def _unique(rows: list[Row]) -> list[Row]:
    seen, out = set(), []
    for r in rows:
        if r.preset not in seen:
            seen.add(r.preset)
            out.append(r)
    return out


def csv_text(rows: list[Row]) -> str:
    """One row per table row; raw numbers (accuracy as a fraction, as results.json), full precision."""
    def num(value: float | None) -> str:
        return "" if value is None else repr(value)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for row in rows:
        p, m = row.paper, row.measured
        writer.writerow([
            row.preset, row.dataset, p.protocol if p else "", row.metric, num(p.value if p else None),
            num(p.ci95 if p else None), p.source if p else "", p.note if p else "", num(m.get("mean")),
            num(m.get("ci95")), ";".join(map(str, m.get("episodes", []))), len(m.get("seeds", [])), num(row.delta),
            "yes" if row.differences else "no", _difference_text(row.differences), row.status,
            ";".join(r.name for r in row.runs)])
    return buffer.getvalue()


def write_table(root: Path, out: Path | None = None, only: list[str] | None = None,
                require_finished: bool = False) -> tuple[str, list[Path], list[Row]]:
    """Build the rows of the runs below ``root`` and write reproduce.md and reproduce.csv into ``out`` (default
    ``root``). ``require_finished``: a ConfigError, and nothing written, when no row has a measurement."""
    rows = build_rows(root, only)
    if require_finished and not any(row.measured for row in rows):
        runs = sum(len(row.runs) for row in rows)
        why = rows[0].status.splitlines()[0] if rows[0].status else "no results.json"
        raise ConfigError(f"none of the {runs} preset run{'s' if runs != 1 else ''} under {root} has finished "
                          f"({why}); finish them (metalearn reproduce with the same --out continues stopped runs) "
                          "or give --from a directory with finished runs")
    from metalearn.fileio import atomic_path  # imports torch: only once there is something to write

    out = Path(out) if out is not None else Path(root)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    table, document = markdown(rows, Path(root))
    written = []
    try:
        for name, text in {"reproduce.md": document, "reproduce.csv": csv_text(rows)}.items():
            with atomic_path(out / name) as tmp:
                tmp.write_text(text)
            written.append(out / name)
    except PermissionError as e:  # a read-only directory of runs
        raise ConfigError(f"cannot write the table: {e.strerror}: {e.filename}; write it elsewhere with --out DIR") from None
    return table, written, rows


# ---------------------------------------------------------------- the command


@dataclass
class Args:
    presets: list[str]
    overrides: list[str]
    source: str | None
    out: str | None


def parse(args: list[str]) -> Args:
    presets: list[str] = []
    overrides: list[str] = []
    source = out = None
    rest = list(args)
    SEARCHPATH[:] = []  # this command's own (a process may run several: tests, the Python API)
    preset.cache_clear()
    while rest:
        a = rest.pop(0)
        flag = a.split("=", 1)[0]
        if flag in ("--from", "--out"):
            value = a.split("=", 1)[1] if "=" in a else (rest.pop(0) if rest else None)
            if not value:
                raise ConfigError(f"{flag} needs a directory; {USAGE.splitlines()[0]}")
            source, out = (value, out) if flag == "--from" else (source, value)
        elif a.startswith("-"):
            raise ConfigError(f"unknown option {a!r} (reproduce sweeps the presets itself: no -m); "
                              f"{USAGE.splitlines()[0]}")
        elif a.startswith("hydra.searchpath="):  # where the user's presets are (--config-dir DIR becomes this)
            SEARCHPATH[:] = [a]
            preset.cache_clear()
        elif a.lstrip("+").startswith("experiment="):
            presets += [p.strip() for p in a.split("=", 1)[1].split(",") if p.strip()]
        elif "=" not in a:  # a bare preset name, as in ``metalearn reproduce maml_omniglot_5w1s``
            presets.append(a)
        else:
            overrides.append(a)
    if source is None and not presets:
        raise ConfigError(f"name the presets to run (experiment=<preset>,...) or read finished runs with --from DIR; "
                          f"{USAGE.splitlines()[0]}")
    overrides += SEARCHPATH  # the training runs find the user's presets (and plug-ins) there too
    if source is not None and overrides != SEARCHPATH:
        raise ConfigError(f"--from reads finished runs: it takes no overrides ({overrides[0]!r}); "
                          "to run presets, leave out --from")
    presets = list(dict.fromkeys(presets))
    for name in presets:
        paper_of(name)  # unknown preset, or no paper: section: one line
    return Args(presets, overrides, source, out)


def _quoted(path: str) -> str:
    """A path as a quoted Hydra override value (commas, spaces and '=' in it stay one value)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_overrides(presets: list[str], overrides: list[str]) -> None:
    """Every preset composes and validates with the overrides, before any of them trains."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from metalearn import confdir
    from metalearn.config import to_run_config

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(str(e).splitlines()[0].rstrip(".") + "; overrides look like key=value") from None
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            raise ConfigError(f"'{o.input_line}' sweeps {key}: reproduce sweeps the presets only; give every other key "
                              "one value (seeds: run metalearn train -m experiment=<preset> seed=0,1,2, then "
                              "metalearn reproduce --from <that sweep>)")
        if key in ("hydra.sweep.dir", "hydra.sweep.subdir", "hydra.run.dir"):
            raise ConfigError(f"{key} is set by reproduce (one run directory per preset under --out); use --out DIR")
    for name in presets:
        try:
            to_run_config(confdir.compose("config", [f"experiment={name}", *overrides]))
        except MetalearnError as e:
            raise ConfigError(f"experiment={name} with {' '.join(overrides) or 'no overrides'}: {e}") from None
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(f"experiment={name} with {' '.join(overrides) or 'no overrides'}: "
                              f"{str(e).splitlines()[0]}") from None


def run_presets(presets: list[str], overrides: list[str], out: Path, train: Callable[[list[str]], int]) -> int:
    """Train the presets as one sweep through ``train`` (the CLI's train app, in this process; passed in so
    that this module does not import the CLI), one run directory each. The exit code of the sweep: 0, 1 if
    some job failed (sweeps.report named them), 130 if interrupted."""
    args = ["-m", f"experiment={','.join(presets)}", *overrides, f"hydra.sweep.dir={_quoted(out)}",
            "hydra.sweep.subdir=${hydra.runtime.choices.experiment}"]
    try:
        return train(args)
    except SystemExit as e:  # a stop request, or a failure the sweep could not record
        return e.code if isinstance(e.code, int) else 1


def reproduce_command(args: list[str], train: Callable[[list[str]], int]) -> int:
    """``metalearn reproduce ARGS``; ``train(overrides)`` runs the train app (metalearn.cli)."""
    if any(a in ("-h", "--help") for a in args):
        print(f"{USAGE}\n\nRuns the named experiment= presets (one run directory each under --out, default "
              "outputs/reproduce/<date>/<time>),\nor reads finished runs with --from, and writes reproduce.md and "
              "reproduce.csv: each preset's paper figure\nbeside the measured test metric ± 95% CI, the difference "
              "in CI units, and whether the run is a proxy\n(differs from its preset: other data, fewer steps ...).")
        return 0
    a = parse(args)
    code = 0
    if a.source is not None:
        root, out, only = Path(a.source), a.out, a.presets or None
    else:
        check_overrides(a.presets, a.overrides)
        root = Path(a.out) if a.out else Path("outputs/reproduce") / datetime.datetime.now().strftime(
            "%Y-%m-%d/%H-%M-%S-%f")
        if root.exists() and not root.is_dir():
            raise ConfigError(f"--out {root} is a file; give a directory")
        out, only = root, None
        code = run_presets(a.presets, a.overrides, root, train)
        if not (root.is_dir() and report.find_runs(root)):
            return code or 1  # nothing ran (the sweep said why)
    table, written, rows = write_table(root, out, only, require_finished=a.source is not None)
    print(table)
    print("\nwrote: " + ", ".join(str(p) for p in written))
    if code and a.source is None:
        print(f"metalearn: the same command with --out {root} continues stopped runs and skips finished ones",
              file=sys.stderr)
    return code
