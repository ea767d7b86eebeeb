"""What durable checkpoints cost: a checkpoint write (metalearn.fileio.atomic_torch_save) with the directory fsync
after the rename against the same write without it, alternating in one process (the machine's drift hits both).

    python scripts/bench_fsync.py [--dir outputs/bench-fsync] [--repeats 20] [--mib 5]

Writes into --dir (default: under the working directory, the disk runs write to) and removes what it wrote.
Prints the median milliseconds of each side and their difference per checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch

from metalearn import fileio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="outputs/bench-fsync")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--mib", type=float, default=5.0, help="checkpoint size (conv4 + Adam state: about 1.3 MiB)")
    a = parser.parse_args()
    folder = Path(a.dir)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"model": {"w": torch.randn(int(a.mib * 2**20 / 4))}, "step": 1}
    real = fileio.fsync_dir
    times: dict[str, list[float]] = {"with directory fsync": [], "without": []}
    try:
        for i in range(a.repeats):
            for side in times:
                fileio.fsync_dir = real if side == "with directory fsync" else (lambda _folder: None)
                start = time.perf_counter()
                fileio.atomic_torch_save(state, folder / "last.pt")
                times[side].append(time.perf_counter() - start)
    finally:
        fileio.fsync_dir = real
        shutil.rmtree(folder, ignore_errors=True)
    medians = {side: 1e3 * statistics.median(t) for side, t in times.items()}
    for side, ms in medians.items():
        print(f"{side:>22}: {ms:7.2f} ms per {a.mib:g} MiB checkpoint (median of {a.repeats})")
    print(f"{'cost':>22}: {medians['with directory fsync'] - medians['without']:+7.2f} ms "
          f"({medians['with directory fsync'] / medians['without']:.3f}x)")


if __name__ == "__main__":
    main()
