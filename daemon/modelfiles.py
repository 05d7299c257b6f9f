"""The model store's file work, all blocking: checksums of files and folders (with
progress), a terminal progress bar, resumable downloads, archives unpacked safely.
Async callers run it with ``asyncio.to_thread``."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Final, TextIO

from daemon.modelmanifest import ModelError

CHUNK: Final = 1 << 20  # read/hash/write unit
DOWNLOAD_TIMEOUT: Final = 30.0  # seconds without a byte before a download is abandoned
PROGRESS_INTERVAL: Final = 0.2  # seconds between progress bar redraws

Progress = Callable[[int, int | None], None]  # (bytes done, bytes total or None)


def _tree_files(root: Path) -> list[Path]:
    return sorted(
        (p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".sha256")),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in _tree_files(root))


def sha256_tree(root: Path, progress: Progress | None = None) -> str:
    """One checksum over a folder: each file's relative path, NUL, length, NUL, contents."""
    digest = hashlib.sha256()
    files = _tree_files(root)
    total = sum(p.stat().st_size for p in files)
    done = 0
    for path in files:
        rel = path.relative_to(root).as_posix().encode()
        digest.update(rel + b"\0" + str(path.stat().st_size).encode() + b"\0")
        done = _feed(digest, path, done, total, progress)
    return digest.hexdigest()


def sha256_path(path: Path, progress: Progress | None = None) -> str:
    """A file's sha256, or a folder's tree hash."""
    return sha256_tree(path, progress) if path.is_dir() else sha256_file(path, progress)


def is_present(path: Path | None) -> bool:
    return path is not None and (path.is_file() or (path.is_dir() and any(path.iterdir())))


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    _feed(digest, path, 0, path.stat().st_size, progress)
    return digest.hexdigest()


def _feed(
    digest: hashlib._Hash, path: Path, done: int, total: int, progress: Progress | None
) -> int:
    """Hash a file's contents in ``CHUNK`` blocks; returns ``done`` plus its size."""
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
            done += len(block)
            if progress:
                progress(done, total)
    return done


class ProgressBar:
    """A one-line progress bar on a terminal (plain start/end lines otherwise)."""

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self._last = 0.0
        self._start = time.monotonic()
        self._done = 0

    def __call__(self, done: int, total: int | None) -> None:
        self._done = done
        now = time.monotonic()
        final = total is not None and done >= total
        if not self.tty or (now - self._last < PROGRESS_INTERVAL and not final):
            return
        self._last = now
        rate = done / max(now - self._start, 1e-6)
        if total:
            frac = min(done / total, 1.0)
            bar = "#" * int(frac * self.width)
            line = (
                f"{self.label} [{bar:<{self.width}}] {frac * 100:5.1f}% "
                f"{_mb(done)}/{_mb(total)} {_mb(int(rate))}/s"
            )
        else:
            line = f"{self.label} {_mb(done)} {_mb(int(rate))}/s"
        self.stream.write("\r" + line)
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
        else:
            self.stream.write(f"{self.label}: {_mb(self._done)}\n")
        self.stream.flush()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def unpack(archive: Path, kind: str, dest: Path) -> None:
    """Unpack into ``dest``, refusing members that would land outside it."""
    root = dest.resolve()
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    if not (root / name).resolve().is_relative_to(root):
                        raise ModelError(f"archive {archive} has an unsafe member {name!r}")
                zf.extractall(root)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(root, filter="data")
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
        raise ModelError(f"cannot unpack {archive}: {exc}") from exc


def part_of(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def download(url: str, part: Path, size: int | None, progress: Progress | None) -> None:
    """Download ``url`` into ``part``, resuming what is already there."""
    have = part.stat().st_size if part.is_file() else 0
    if size is not None and have >= size:
        return  # complete already: the checksum decides
    headers = {"User-Agent": "mtor-models/1"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            return  # nothing left to fetch: the checksum decides
        raise ModelError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelError(f"download of {url} failed: {reason}") from exc
    with contextlib.closing(response):
        if have and response.status != 206:
            have = 0  # the server ignored the range: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else size
        done = have
        try:
            with part.open("ab" if have else "wb") as out:
                while block := response.read(CHUNK):
                    out.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise ModelError(
                f"download of {url} was interrupted at {done} bytes ({exc}); "
                f"the partial file {part} is kept: pull again to resume"
            ) from exc
    if total is not None and done < total:
        raise ModelError(
            f"download of {url} ended early at {done} of {total} bytes; "
            f"the partial file {part} is kept: pull again to resume"
        )
