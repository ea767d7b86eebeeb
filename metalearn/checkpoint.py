"""Checkpoints: plain data only, so ``torch.load(weights_only=True)`` reads them.

``<run>/checkpoints/last.pt`` (written every ``trainer.ckpt_every`` steps and
when a run stops) and ``best.pt`` (best validation metric) hold the
meta-parameters, optimizer, scheduler, step, best metric, every RNG state
(python, numpy, torch, CUDA, the episode sampler), the resolved config, the
training problem (``problem``: what ``engine.problem_record`` keeps, from which
``metalearn eval`` rebuilds the model without the training data) and the package
version. Writes are atomic: a run directory never holds a partial checkpoint under its name,
whatever kills the process; the hidden temp file a SIGKILL can leave (``.last.pt.tmp-*``) is
never read, and the next run in the directory removes it (``remove_partial``).
"""

from __future__ import annotations

import io
import logging
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metalearn import __version__, faults
from metalearn.errors import CheckpointError
from metalearn.fileio import atomic_path, atomic_torch_save

log = logging.getLogger(__name__)

FORMAT = "metalearn-checkpoint"
FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, **content: Any) -> None:
    obj = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": __version__, **content}
    if faults.at("save", content.get("step"), Path(path).stem):  # the testing hook (metalearn/faults.py)
        with atomic_path(path) as tmp:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            tmp.write_bytes(buffer.getvalue()[: buffer.tell() // 2])
            faults.trigger()
    atomic_torch_save(obj, path)


def remove_partial(folder: Path) -> list[Path]:
    """Remove the temp files of checkpoint writes that a killed process left in ``folder``."""
    partial = sorted(Path(folder).glob(".*.tmp-*"))
    for p in partial:
        p.unlink(missing_ok=True)
    return partial


def load(path: str | Path, fix: str | None = None) -> dict[str, Any]:
    """Load and check a checkpoint; every failure is one CheckpointError line (ending with ``fix`` if given)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; give a run directory with checkpoints/last.pt or a .pt file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError, OSError):
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a metalearn checkpoint (torch.load cannot read it); "
            f"{fix or 'use another checkpoint (last.pt / best.pt) or start a new run'}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a metalearn checkpoint; {fix or 'give a file written by metalearn train'}")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {ckpt.get('format_version')} (metalearn {ckpt.get('version')}); "
            f"this metalearn {__version__} reads format {FORMAT_VERSION}: use the metalearn version that wrote it"
        )
    if isinstance(ckpt.get("config"), dict):
        from metalearn.renamed import migrate

        changed = migrate(ckpt["config"])  # a config written before the data keys were renamed
        if changed:
            from metalearn.config import to_dict, to_run_config
            from metalearn.errors import MetalearnError

            try:  # complete, as a current checkpoint's config is (the new keys with their defaults)
                ckpt["config"] = to_dict(to_run_config(ckpt["config"]))
            except MetalearnError:
                pass  # whoever reads it reports what is wrong with it
            log.info("%s", migration_note(path, changed))
            ckpt["migrated"] = changed  # in memory only: metalearn eval prints it (its log goes nowhere)
    return ckpt


def migration_note(path: Path, changed: list[str]) -> str:
    return f"{path}: its config predates the data split keys; read with the current ones ({'; '.join(changed)})"


#: Keys of a run's config that may change when it is resumed (``metalearn train resume=DIR key=value``).
CHANGEABLE = ("steps", "trainer.", "device.", "data.root", "data.cache_dir", "eval.batch_size", "resume")


def load_for_resume(run: str | Path) -> tuple[Path, dict[str, Any]]:
    """``checkpoints/last.pt`` of a run directory (or a checkpoint file), checked to be readable and, when the
    directory records its config (``.hydra/config.yaml``), to be this run's. Each failure is one line that
    names the file and what to do."""
    path = find(run, "last")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    ckpt = load(path, fix=_resume_fix(path, run_dir))
    if run_dir is not None:
        differ = _differs_from_record(ckpt, run_dir)
        if differ:
            key, there, here = differ
            raise CheckpointError(f"{path} is another run's checkpoint ({key}={there!r} in it, {here!r} in "
                                  f"{run_dir / '.hydra' / 'config.yaml'}); {_resume_fix(path, run_dir)}")
    return path, ckpt


def _resume_fix(path: Path, run_dir: Path | None) -> str:
    """What to do about an unusable last.pt: resume from the run's best.pt if that is sound, or start again."""
    best = path.with_name("best.pt")
    if run_dir is not None and best.is_file() and best != path:
        try:
            ckpt = torch.load(best, map_location="cpu", weights_only=True)
            if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT and not _differs_from_record(ckpt, run_dir):
                return f"to resume from {best} (step {ckpt['step']}) copy it over {path.name}, or start a new run"
        except Exception:  # noqa: BLE001 - an unreadable best.pt is no way out either
            pass
    return "delete it and start a new run (metalearn train with this run's overrides)"


def _differs_from_record(ckpt: dict[str, Any], run_dir: Path) -> tuple[str, Any, Any] | None:
    """The first config key (not one that may change on resume) where the checkpoint and the run's recorded
    config differ: (key, checkpoint's value, recorded value); None if they agree or nothing is recorded."""
    recorded = run_dir / ".hydra" / "config.yaml"
    if not recorded.is_file():
        return None
    from omegaconf import OmegaConf

    from metalearn.config import flat, to_dict, to_run_config

    from metalearn.renamed import migrate

    try:
        record = OmegaConf.to_container(OmegaConf.load(recorded), resolve=True)
        migrate(record)  # as the checkpoint's config was, when loaded
        here = flat(to_dict(to_run_config(record)))
    except Exception:  # noqa: BLE001 - a record this version cannot read says nothing about the checkpoint
        return None
    there = flat(ckpt.get("config") or {})
    for key in sorted(there.keys() | here.keys()):
        if not key.startswith(CHANGEABLE) and there.get(key, "<absent>") != here.get(key, "<absent>"):
            return key, there.get(key, "<absent>"), here.get(key, "<absent>")
    return None


def find(run_or_file: str | Path, which: str = "last") -> Path:
    """A checkpoint file from a run directory (``checkpoints/<which>.pt``) or a file path."""
    p = Path(run_or_file).expanduser()
    if p.is_dir():
        candidate = p / "checkpoints" / f"{which}.pt"
        if not candidate.is_file():
            if which == "last" and (p / ".hydra" / "config.yaml").is_file():  # a run killed before its first checkpoint
                raise CheckpointError(f"{p} is a run that stopped before its first checkpoint (no checkpoints/last.pt): "
                                      f"nothing to resume; start it again with its overrides ({p / '.hydra' / 'overrides.yaml'})")
            raise CheckpointError(f"{p} has no checkpoints/{which}.pt; is it a metalearn run directory (outputs/<date>/<time>)?")
        return candidate
    if not p.exists():
        raise CheckpointError(f"{p} does not exist; give a run directory or a checkpoint file")
    return p


def load_model_state(module: torch.nn.Module, state: dict, path: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{path} does not fit this model ({first}); evaluate it with the config it was trained with") from None
