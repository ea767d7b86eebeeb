"""TensorBoard logging: scalars under ``group/name`` tags and one HParams entry per run.

``SummaryWriter.add_hparams`` writes into a new time-named sub-directory, so
every call shows up as a separate run (pytorch#32651). We write the three
hparams summaries into the run's own event file instead: the HParams tab then
shows one row per run directory, with its final metrics taken from the run's
scalars of the same tags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries


def hparam_metrics(metric: str) -> tuple[str, ...]:
    """The scalar tags the HParams tab shows for a run whose checkpoints are chosen by ``metric``."""
    return (f"val/{metric}", f"val/best_{metric}", f"test/{metric}", f"test/{metric}_ci95")


class TensorBoard:
    def __init__(self, log_dir: Path, purge_step: int | None = None):
        # purge_step hides what a crashed run logged after its last checkpoint.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def hparams(self, params: dict[str, Any], metrics: tuple[str, ...]) -> None:
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        for summary in hparams_summaries(clean, {m: 0.0 for m in metrics}):
            self.writer.file_writer.add_summary(summary)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class NoTensorBoard:
    """Writes nothing: the TensorBoard of a process that is not rank 0 of a torchrun job."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def hparams(self, params: dict[str, Any], metrics: tuple[str, ...]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
