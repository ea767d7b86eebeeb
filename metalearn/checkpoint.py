"""Checkpoints: plain data only, so ``torch.load(weights_only=True)`` reads them.

``<run>/checkpoints/last.pt`` (written every ``trainer.ckpt_every`` steps and
when a run stops) and ``best.pt`` (best validation metric) hold the
meta-parameters, optimizer, scheduler, step, best metric, every RNG state
(python, numpy, torch, CUDA, the episode sampler), the resolved config and
the package version. Writes are atomic.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metalearn import __version__
from metalearn.errors import CheckpointError
from metalearn.fileio import atomic_torch_save

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
    atomic_torch_save({"format": FORMAT, "format_version": FORMAT_VERSION, "version": __version__, **content}, path)


def load(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint; every failure is one CheckpointError line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; give a run directory with checkpoints/last.pt or a .pt file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError, OSError):
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a metalearn checkpoint (torch.load cannot read it); "
            f"use another checkpoint (last.pt / best.pt) or start a new run"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a metalearn checkpoint; give a file written by metalearn train")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {ckpt.get('format_version')} (metalearn {ckpt.get('version')}); "
            f"this metalearn {__version__} reads format {FORMAT_VERSION}: use the metalearn version that wrote it"
        )
    return ckpt


def find(run_or_file: str | Path, which: str = "last") -> Path:
    """A checkpoint file from a run directory (``checkpoints/<which>.pt``) or a file path."""
    p = Path(run_or_file).expanduser()
    if p.is_dir():
        candidate = p / "checkpoints" / f"{which}.pt"
        if not candidate.is_file():
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
