"""Vision: detectors on real photos (scikit-image data) with the real models, and
the vision node through a real realm (broker, orchestrator, worker, `mtor detect`),
``vision.describe`` against a local server speaking Anthropic's Messages API and
``imagine`` against one speaking AUTOMATIC1111's txt2img API.  No network."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from daemon.broker import PrivateBroker
from daemon.bus import Inbound
from daemon.client import RealmClient, TaskFailed
from daemon.errors import TaskError
from daemon.modelstore import ModelStore
from daemon.orchestrator.service import Orchestrator
from daemon.protocol.task import Constraints
from daemon.runtime import NodeDaemon
from nodes.vision.config import FacesConfig, HogConfig, YoloOnnxConfig
from nodes.vision.detect import DetectorEnv, DetectorUnavailable, load_detector
from nodes.vision.faces import HaarFaces
from nodes.vision.images import decode_b64, encode_jpeg_b64, media_type
from nodes.vision.yolo import YoloOnnxDetector, letterbox, parse_names
from tests.conftest import ROOT, Collector, make_config, mtor_env, running_bus

KEY = "sk-ant-test-vision"


def photo(name: str) -> np.ndarray:
    img = getattr(skdata, name)()
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(img, cv2.COLOR_RGB2BGR)


def inside(point: tuple[float, float], box: list[float] | tuple[float, ...]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


# ----------------------------------------------------------------- unit


def test_letterbox_keeps_aspect_and_centres() -> None:
    img = np.zeros((100, 200, 3), np.uint8)
    canvas, scale, dx, dy = letterbox(img, 640, 640)
    assert canvas.shape == (640, 640, 3)
    assert scale == 3.2 and dx == 0 and dy == 160
    assert (canvas[0, 0] == 114).all() and (canvas[320, 320] == 0).all()


def test_parse_names() -> None:
    assert parse_names("{0: 'Normal', 1: 'Fall'}") == ["Normal", "Fall"]
    assert parse_names("['a', 'b']") == ["a", "b"]
    assert parse_names("not python") is None
    assert parse_names(None) is None


def test_images_roundtrip_and_errors() -> None:
    img = photo("coffee")
    text = encode_jpeg_b64(img)
    back = decode_b64(text)
    assert back.shape == img.shape
    assert decode_b64("data:image/jpeg;base64," + text).shape == img.shape
    small = encode_jpeg_b64(img, max_chars=20_000)  # downscaled until it fits
    assert len(small) <= 20_000 and decode_b64(small).shape[1] < img.shape[1]
    assert media_type(base64.b64decode(text)) == "image/jpeg"
    with pytest.raises(TaskError, match="base64"):
        decode_b64("not base64!")
    with pytest.raises(TaskError, match="decoded"):
        decode_b64(base64.b64encode(b"hello world").decode())
    with pytest.raises(TaskError, match="cap"):
        decode_b64("A" * 100, max_chars=50)


# ------------------------------------------------------------ detectors


@pytest.fixture(scope="module")
def yolo() -> YoloOnnxDetector:
    det = load_detector(YoloOnnxConfig(), DetectorEnv(store=ModelStore.default()))
    assert isinstance(det, YoloOnnxDetector)
    return det


@pytest.fixture(scope="module")
def faces() -> HaarFaces:
    f = HaarFaces(FacesConfig())
    f.load()
    return f


def test_yolo_classes_come_from_the_manifest(yolo: YoloOnnxDetector) -> None:
    assert yolo.labels == ["upright", "fall"]
    assert ModelStore.default().entry("yolov8n-fall").extra["classes"] == yolo.labels


def test_yolo_finds_the_astronaut_upright(yolo: YoloOnnxDetector, faces: HaarFaces) -> None:
    img = photo("astronaut")
    found = yolo.detect(img)
    assert found, "the fall model sees no one in the astronaut photo"
    best = found[0]
    assert best.label == "upright" and best.score > 0.5  # a person, upright
    (face,) = faces.detect(img)
    fx, fy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    assert inside((fx, fy), best.box), (face, best)  # the person box holds her face


def test_yolo_rejects_a_bad_model_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(DetectorUnavailable):
        load_detector(YoloOnnxConfig(model_path=bad), DetectorEnv())
    with pytest.raises(DetectorUnavailable, match="does not exist"):
        load_detector(YoloOnnxConfig(model_path=tmp_path / "none.onnx"), DetectorEnv())


def test_haar_finds_one_face_in_astronaut_none_in_coffee(faces: HaarFaces) -> None:
    (face,) = faces.detect(photo("astronaut"))
    x1, y1, x2, y2 = face.box
    assert 150 < (x1 + x2) / 2 < 300 and 50 < (y1 + y2) / 2 < 180  # her face, top centre
    assert faces.detect(photo("coffee")) == []


def test_hog_sees_no_pedestrian_in_photos_without_one() -> None:
    hog = load_detector(HogConfig(), DetectorEnv())
    for name in ("coffee", "chelsea", "camera", "astronaut"):  # astronaut: a portrait
        assert hog.detect(photo(name)) == [], name


# ------------------------------------------------------- fake remote APIs


class FakeAPIs(http.server.BaseHTTPRequestHandler):
    """Anthropic's /v1/messages (non-streaming) and AUTOMATIC1111's txt2img."""

    requests: list[dict[str, Any]]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _json(self, status: int, obj: Any) -> None:
        raw = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def sent_key(self) -> str | None:
        """The API key as sent (SDK 0.x: x-api-key; 2.x: a bearer token)."""
        auth = self.headers.get("authorization", "")
        return self.headers.get("x-api-key") or auth.removeprefix("Bearer ") or None

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        self.requests.append({"path": self.path, "body": body, "key": self.sent_key()})
        if self.path == "/v1/messages":
            self._messages(body)
        elif self.path == "/sdapi/v1/txt2img":
            self._txt2img(body)
        else:
            self._json(404, {"detail": "Not Found"})

    def _messages(self, body: dict[str, Any]) -> None:
        if self.sent_key() != KEY:
            err = {"type": "authentication_error", "message": "invalid x-api-key"}
            self._json(401, {"type": "error", "error": err})
            return
        blocks = body["messages"][-1]["content"]
        image = next(b for b in blocks if b["type"] == "image")["source"]
        question = next(b for b in blocks if b["type"] == "text")["text"]
        raw = base64.b64decode(image["data"])
        img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
        # The answer depends on the image the server really decoded.
        text = f"{image['media_type']} {img.shape[1]}x{img.shape[0]}: {question}"
        self._json(
            200,
            {
                "id": "msg_01Vision",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 1200, "output_tokens": 12},
            },
        )

    def _txt2img(self, body: dict[str, Any]) -> None:
        if not isinstance(body.get("prompt"), str):
            self._json(422, {"detail": [{"loc": ["body", "prompt"], "msg": "field required"}]})
            return
        w, h = int(body.get("width", 512)), int(body.get("height", 512))
        img = np.zeros((h, w, 3), np.uint8)
        img[:, :, 2] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
        ok, png = cv2.imencode(".png", img)
        assert ok
        seed = body.get("seed", -1)
        seed = 1234 if seed in (-1, None) else seed
        info = json.dumps({"prompt": body["prompt"], "seed": seed, "width": w, "height": h})
        images = [base64.b64encode(png.tobytes()).decode()]
        self._json(200, {"images": images, "parameters": body, "info": info})


@contextlib.contextmanager
def fake_apis() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    requests: list[dict[str, Any]] = []
    cls = type("H", (FakeAPIs,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), cls)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


# ---------------------------------------------------------- through a realm


@contextlib.asynccontextmanager
async def vision_realm(
    broker: PrivateBroker, realm: str, tmp: Path, node: dict[str, Any]
) -> AsyncIterator[tuple[RealmClient, NodeDaemon]]:
    base = {"orchestrator": {"state_dir": str(tmp / "orch")}}
    orch = Orchestrator(make_config(broker.url, realm, **base))
    daemon = NodeDaemon(make_config(broker.url, realm, node_id="eye", nodes={"v": node}, **base))
    stops = [asyncio.Event(), asyncio.Event()]
    tasks = [asyncio.create_task(orch.run(stops[0])), asyncio.create_task(daemon.run(stops[1]))]
    try:
        async with asyncio.timeout(30):
            await orch._online.wait()
            await daemon._online.wait()
            while not (daemon.hosted["v"].ready or daemon.hosted["v"].job.status == "failed"):
                await asyncio.sleep(0.05)
            while "vision.detect" not in orch.registry.free and node.get("detect") != []:
                await asyncio.sleep(0.05)
        async with running_bus(make_config(broker.url, realm)) as bus:
            client = RealmClient(bus, realm, user="tester")
            await client.start()
            yield client, daemon
    finally:
        for s in reversed(stops):
            s.set()
        for t in reversed(tasks):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(t, 15)


async def test_vision_node_through_the_realm(
    broker: PrivateBroker, realm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    with fake_apis() as (url, requests):
        node = {
            "type": "vision",
            "describe": {"base_url": url, "model": "claude-test", "max_retries": 0},
            "imagine": {"base_url": url, "steps": 4},
        }
        async with vision_realm(broker, realm, tmp_path, node) as (client, daemon):
            caps = {(c.name, c.backend) for c in daemon.capabilities()}
            assert caps == {
                ("vision.detect", "ssd_tf"),
                ("vision.detect", "darknet"),
                ("vision.detect", "hog"),
                ("vision.faces", "haar"),
                ("vision.describe", "anthropic"),
                ("imagine", "automatic1111"),
            }
            astronaut = encode_jpeg_b64(photo("astronaut"))

            # no backend asked for: the best detector for each label (person: the SSD)
            out = await client.call("vision.detect", {"image": astronaut})
            assert out["backend"] == "auto" and (out["width"], out["height"]) == (512, 512)
            assert out["detections"][0]["label"] == "person"
            assert out["detections"][0]["score"] > 0.8
            out = await client.call(
                "vision.detect",
                {"image": encode_jpeg_b64(photo("coffee")), "labels": ["cup", "person"]},
            )
            assert [d["label"] for d in out["detections"]] == ["cup"]
            assert out["model"] == "ssdlite-mobilenet-v2-person+yolov3-tiny-coco"
            out = await client.call(
                "vision.detect", {"image": astronaut}, constraints=Constraints(backend="ssd_tf")
            )
            assert out["backend"] == "ssd_tf" and out["detections"][0]["label"] == "person"
            out = await client.call(
                "vision.detect", {"image": astronaut}, constraints=Constraints(backend="hog")
            )
            assert out["backend"] == "hog" and out["detections"] == []
            out = await client.call("vision.faces", {"image": astronaut})
            assert [f["label"] for f in out["faces"]] == ["face"]

            with pytest.raises(TaskFailed) as failed:
                await client.call("vision.detect", {"image": "@@@"})
            assert failed.value.code == "bad_input"
            with pytest.raises(TaskFailed) as failed:
                await client.call("vision.detect", {"picture": astronaut})
            assert failed.value.code == "bad_input" and "image" in str(failed.value)

            # vision.describe: the image reaches the API as an image block.
            out = await client.call(
                "vision.describe", {"image": astronaut, "question": "Who is this?"}
            )
            assert out["text"] == "image/jpeg 512x512: Who is this?"
            assert out["model"] == "claude-test"
            sent = next(r for r in requests if r["path"] == "/v1/messages")
            assert sent["key"] == KEY

            # imagine: the PNG comes back on a media topic, retained.
            out = await client.call("imagine", {"prompt": "a red fox", "width": 96, "height": 64})
            assert out["content_type"] == "image/png" and out["seed"] == 1234
            got = Collector()
            await client.bus.subscribe(out["media_topic"], got)
            msg: Inbound = await got.wait_for(lambda m: bool(m.payload), timeout=5)
            assert msg.content_type == "image/png" and msg.retain
            img = cv2.imdecode(np.frombuffer(msg.payload, np.uint8), cv2.IMREAD_COLOR)
            assert img.shape == (64, 96, 3)
            body = next(r for r in requests if r["path"] == "/sdapi/v1/txt2img")["body"]
            assert body["prompt"] == "a red fox" and body["steps"] == 4

            # `mtor detect` as a real process against the same realm.
            path = tmp_path / "astronaut.png"
            cv2.imwrite(str(path), photo("astronaut"))
            env = mtor_env(MTOR_BROKER=broker.url, MTOR_REALM=realm)
            proc = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "daemon.cli.main", "detect", str(path)],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
                timeout=60,
            )
            assert proc.returncode == 0, proc.stderr
            assert "512x512" in proc.stdout and "person" in proc.stdout


async def test_imagine_not_advertised_unless_configured_and_describe_needs_a_key(
    broker: PrivateBroker, realm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    node = {"type": "vision", "detect": [], "describe": {"base_url": "http://127.0.0.1:9"}}
    async with vision_realm(broker, realm, tmp_path, node) as (_client, daemon):
        names = {c.name for c in daemon.capabilities()}
        assert names == {"vision.faces"}
