"""Durable writes (#26): every atomic write fsyncs the file, then its directory (and the parent of each folder it
made), observed through os.fsync itself; a failed write leaves nothing."""

from __future__ import annotations

import os

import pytest
import torch

from metalearn import fileio


@pytest.fixture
def synced(monkeypatch):
    """The paths os.fsync is called on, in order."""
    seen: list[str] = []
    real = os.fsync

    def fsync(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_a_checkpoint_write_fsyncs_the_file_then_its_directory(tmp_path, synced):
    target = tmp_path / "run" / "checkpoints" / "last.pt"
    fileio.atomic_torch_save({"w": torch.ones(3)}, target)
    assert torch.load(target, weights_only=True)["w"].sum() == 3
    assert os.path.basename(synced[0]).startswith(".last.pt.tmp-")  # the data, before the rename
    assert synced[1:] == [str(target.parent), str(tmp_path), str(tmp_path / "run")]  # the rename; the made folders
    synced.clear()
    fileio.atomic_write_json(target.with_name("results.json"), {"a": 1})
    assert os.path.basename(synced[0]).startswith(".results.json.tmp-") and synced[1:] == [str(target.parent)]


def test_the_engine_and_caches_write_through_it(tmp_path, synced):
    from metalearn.data.common import cached

    cached(tmp_path / "cache" / "x.pt", {"v": 1}, lambda: {"t": torch.zeros(2)}, "test")
    assert str(tmp_path / "cache") in synced


def test_extraction_syncs_before_its_rename_and_the_rename_after(tmp_path, monkeypatch, synced):
    import zipfile

    from metalearn.data import download

    calls = []
    real = download.sync_file_system
    monkeypatch.setattr(download, "sync_file_system", lambda folder: (calls.append("sync"), real(folder)))
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("top/x/1.txt", "one")
    dest = tmp_path / "out" / "top"
    dest.parent.mkdir()
    download.extract_zip(archive, dest, "top")
    assert calls == ["sync"] and str(dest.parent) in synced and (dest / "x" / "1.txt").read_text() == "one"
