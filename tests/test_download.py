"""Downloads against a real local HTTP server, and zip extraction: all-or-nothing either way."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from metalearn.data import download as dl
from metalearn.data import omniglot
from metalearn.errors import DataError


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (105, 105), 1).save(buffer, format="PNG")
    return buffer.getvalue()


ARCHIVE = make_zip({"x/a/1.txt": b"one", "x/a/2.txt": b"two" * 1000, "x/b/3.txt": b"three"})


@pytest.fixture
def server(http_server):
    http_server[0].files["/x.zip"] = ARCHIVE
    return http_server


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_writes_the_verified_file(server, tmp_path):
    _, url = server
    dest = dl.download(f"{url}/x.zip", tmp_path / "x.zip", md5=hashlib.md5(ARCHIVE).hexdigest(), timeout=5)
    assert dest.read_bytes() == ARCHIVE
    assert list(tmp_path.iterdir()) == [dest]


def test_md5_mismatch_keeps_nothing(server, tmp_path):
    _, url = server
    message = f"x.zip downloaded from {url}/x.zip has md5 {hashlib.md5(ARCHIVE).hexdigest()}, expected {'0' * 32}; nothing was kept"
    with pytest.raises(DataError, match=re.escape(message)):
        dl.download(f"{url}/x.zip", tmp_path / "x.zip", md5="0" * 32, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_transfer_keeps_nothing(server, tmp_path):
    _, url = server
    with pytest.raises(DataError, match=f"{re.escape(url)}/cut/x.zip .*nothing was kept.*by hand to {re.escape(str(tmp_path / 'x.zip'))}$"):
        dl.download(f"{url}/cut/x.zip", tmp_path / "x.zip", timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_http_error_keeps_nothing(server, tmp_path):
    _, url = server
    with pytest.raises(DataError, match="HTTP 404"):
        dl.download(f"{url}/missing.zip", tmp_path / "x.zip", timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_malformed_url(tmp_path):
    with pytest.raises(DataError, match="download of example.org/x.zip failed .*unknown url type"):
        dl.download("example.org/x.zip", tmp_path / "x.zip")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_download_keeps_nothing(server, tmp_path, monkeypatch):
    _, url = server

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(dl, "_progress", interrupt)
    with pytest.raises(KeyboardInterrupt):
        dl.download(f"{url}/x.zip", tmp_path / "x.zip", timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_load_rejects_a_wrong_official_archive(server, tmp_path):
    httpd, url = server
    httpd.files["/images_background.zip"] = make_zip({"images_background/Greek/character01/1.png": b"?"})
    message = r"images_background.zip downloaded from .* has md5 \w+, expected 68d2efa1b9178cc56df9314c21c6e718; nothing was kept"
    with pytest.raises(DataError, match=message):
        omniglot.load(omniglot.Config(root=str(tmp_path), base_url=url))
    assert list((tmp_path / "omniglot").iterdir()) == []


def test_load_downloads_and_extracts_archives(server, tmp_path, monkeypatch):
    httpd, url = server
    for name in omniglot.OFFICIAL_MD5:
        body = make_zip({f"{name}/Greek/character01/1.png": png()})
        httpd.files[f"/{name}.zip"] = body
        monkeypatch.setitem(omniglot.OFFICIAL_MD5, name, hashlib.md5(body).hexdigest())
    # Downloaded and extracted fine; the fake archives then lack most Vinyals characters.
    with pytest.raises(DataError, match="archives look incomplete"):
        omniglot.load(omniglot.Config(root=str(tmp_path), base_url=url + "/"))
    folder = tmp_path / "omniglot"
    assert (folder / "images_evaluation/Greek/character01/1.png").read_bytes() == png()
    assert sorted(p.name for p in folder.iterdir() if p.name != "cache") == [
        "images_background", "images_background.zip", "images_evaluation", "images_evaluation.zip"
    ]


def test_unreachable_server_says_where_to_put_the_archive(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(DataError) as error:
        omniglot.load(omniglot.Config(root=str(tmp_path), base_url=url))
    message = str(error.value)
    assert f"could not download {url}/images_background.zip" in message
    assert f"download it by hand to {tmp_path / 'omniglot/images_background.zip'}" in message
    assert list((tmp_path / "omniglot").iterdir()) == []


def test_extract_zip_strips_the_top_folder(tmp_path):
    (tmp_path / "x.zip").write_bytes(ARCHIVE)
    dest = dl.extract_zip(tmp_path / "x.zip", tmp_path / "out", subdir="x")
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*.txt")) == ["a/1.txt", "a/2.txt", "b/3.txt"]
    assert (dest / "a/2.txt").read_bytes() == b"two" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "x.zip"]


def test_extract_zip_refuses_escaping_entries(tmp_path):
    (tmp_path / "evil.zip").write_bytes(make_zip({"x/ok.txt": b"ok", "x/../../evil": b"gotcha"}))
    with pytest.raises(DataError, match=r"entry pointing outside its folder \('x/../../evil'\), refused"):
        dl.extract_zip(tmp_path / "evil.zip", tmp_path / "out", subdir="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip"]


def test_extract_zip_without_the_folder(tmp_path):
    (tmp_path / "x.zip").write_bytes(ARCHIVE)
    with pytest.raises(DataError, match="has no folder 'y/' inside"):
        dl.extract_zip(tmp_path / "x.zip", tmp_path / "out", subdir="y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.zip"]


def test_failed_extraction_leaves_no_folder(tmp_path, monkeypatch):
    (tmp_path / "x.zip").write_bytes(ARCHIVE)
    copies = []

    def copy_then_interrupt(src, dst, length):
        copies.append(dst)
        if len(copies) == 2:
            raise KeyboardInterrupt
        dst.write(src.read())

    monkeypatch.setattr(dl.shutil, "copyfileobj", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        dl.extract_zip(tmp_path / "x.zip", tmp_path / "out", subdir="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.zip"]


def test_extract_zip_keeps_a_folder_another_process_made(tmp_path, monkeypatch):
    (tmp_path / "x.zip").write_bytes(ARCHIVE)
    (tmp_path / "out/a").mkdir(parents=True)  # not empty, so the rename onto it fails
    assert dl.extract_zip(tmp_path / "x.zip", tmp_path / "out", subdir="x") == tmp_path / "out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "x.zip"]


def test_corrupt_zip(tmp_path):
    path = Path(tmp_path / "x.zip")
    path.write_bytes(ARCHIVE[: len(ARCHIVE) // 2])
    with pytest.raises(DataError, match="x.zip is corrupt .*; delete it and run again"):
        dl.extract_zip(path, tmp_path / "out", subdir="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.zip"]


def test_check_md5(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    dl.check_md5(path, hashlib.md5(b"hello").hexdigest().upper(), "https://example.org/f.bin")
    with pytest.raises(DataError, match=r"f.bin has md5 5d41.*, expected 0+: it is corrupt .* \(https://example.org/f.bin\)"):
        dl.check_md5(path, "0" * 32, "https://example.org/f.bin")
