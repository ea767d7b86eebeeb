"""Fetching and unpacking dataset archives, safely.

Both helpers are all-or-nothing: a failed or interrupted download leaves no
file behind, and a failed extraction leaves no folder, so the next run starts
clean instead of tripping over half-written data.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from metalearn.errors import DataError
from metalearn.fileio import atomic_path, fsync_dir, sync_file_system

_CHUNK = 1 << 20


def download(url: str, dest: str | os.PathLike, md5: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (streamed into a temp file beside it, then renamed).

    The body must match the Content-Length header, when there is one, and
    ``md5``, when given. On any failure, Ctrl-C included, nothing is kept and a
    DataError names the URL, the problem and ``dest``. ``timeout`` (seconds)
    applies to each network operation, not to the whole transfer.
    """
    dest = Path(dest)
    by_hand = f"check the connection and run again, or download it by hand to {dest}"
    try:
        with atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            expected = response.headers.get("Content-Length")
            expected = int(expected) if expected is not None else None
            digest = hashlib.md5(usedforsecurity=False)
            received = 0
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                _progress(dest.name, received, expected)
            _progress_done()
            if expected is not None and received != expected:
                raise DataError(
                    f"download of {url} was cut off after {received} of {expected} bytes; nothing was kept; {by_hand}"
                )
            if md5 is not None and digest.hexdigest() != md5.lower():
                raise DataError(
                    f"{dest.name} downloaded from {url} has md5 {digest.hexdigest()}, expected {md5}; "
                    f"nothing was kept; run again, or download it by hand to {dest} from a trusted mirror"
                )
    except urllib.error.HTTPError as e:
        raise DataError(f"could not download {url}: HTTP {e.code} {e.reason}; nothing was kept; {by_hand}") from None
    except urllib.error.URLError as e:
        raise DataError(f"could not download {url}: {e.reason}; nothing was kept; {by_hand}") from None
    except (OSError, http.client.HTTPException, ValueError) as e:  # timeouts, resets, truncated bodies, bad URLs, disk full
        raise DataError(f"download of {url} failed ({type(e).__name__}: {e}); nothing was kept; {by_hand}") from None
    return dest


def extract_zip(archive: str | os.PathLike, dest_dir: str | os.PathLike, subdir: str = "") -> Path:
    """Extract the zip ``archive`` so that it appears at ``dest_dir`` complete, or not at all.

    With ``subdir``, only the members under that top folder are extracted,
    and its contents land directly in ``dest_dir`` (``x.zip`` holding ``x/...``
    extracted with ``subdir="x"`` gives ``dest_dir/...``). Members are written
    to a temp folder beside ``dest_dir`` that is renamed into place at the end;
    on any error, Ctrl-C included, the temp folder is removed. Members whose
    path would escape ``dest_dir`` (``../x``, absolute paths) are refused.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    prefix = subdir.strip("/") + "/" if subdir else ""
    try:
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{dest_dir.name}.tmp-", dir=dest_dir.parent) as tmp, zipfile.ZipFile(archive) as zf:
            staging = Path(tmp) / dest_dir.name
            staging.mkdir()
            members = [m for m in zf.infolist() if m.filename.startswith(prefix) and m.filename != prefix]
            if not members:
                raise DataError(
                    f"{archive} has no folder {prefix!r} inside, so it is not the expected archive; replace it with the right file"
                )
            for member in members:
                relative = PurePosixPath(member.filename[len(prefix) :])
                if relative.is_absolute() or ".." in relative.parts:
                    raise DataError(
                        f"{archive} holds an entry pointing outside its folder ({member.filename!r}), refused; "
                        "delete the file and get it from a trusted source"
                    )
                target = staging.joinpath(*relative.parts)
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
            # The extracted files on disk before their folder gets its name (one sync of that file system, not one
            # fsync per file: Omniglot is thousands), and the rename durable: a power cut leaves all or nothing.
            sync_file_system(staging)
            try:
                os.replace(staging, dest_dir)
            except OSError:
                # Another process (a parallel sweep job) extracted the same archive first: use its copy.
                if not dest_dir.is_dir():
                    raise
            else:
                fsync_dir(dest_dir.parent)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise DataError(f"{archive} is corrupt ({e}); delete it and run again to download or copy it afresh") from None
    except OSError as e:
        raise DataError(
            f"cannot extract {archive} into {dest_dir.parent} ({e}); make room there or make the folder writable"
        ) from None
    return dest_dir


def md5_of(path: str | os.PathLike) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_md5(path: str | os.PathLike, md5: str, source: str) -> None:
    """Raise a DataError if the file at ``path`` does not have ``md5``; ``source`` says where to get a good copy."""
    actual = md5_of(path)
    if actual != md5.lower():
        raise DataError(f"{path} has md5 {actual}, expected {md5}: it is corrupt or another file; "
                        f"delete it and run again, or put the right file there ({source})")


def _progress(name: str, received: int, expected: int | None) -> None:
    if not sys.stderr.isatty():
        return
    total = f" of {expected / 1e6:.1f}" if expected else ""
    sys.stderr.write(f"\rdownloading {name}: {received / 1e6:.1f}{total} MB")
    sys.stderr.flush()


def _progress_done() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\n")
