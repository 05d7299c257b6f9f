"""The gateway's HTTP API with httpx, against a real gateway, orchestrator and node on
the generated broker (accounts and ACL as ``mtor up`` makes them).

Checked: tokens and roles (the orchestrator's, relayed), tasks (submit, wait, follow by
SSE, cancel), the live picture, admin for sysops only, OpenAI-style errors for bad
input, unknown routes, oversized bodies, missing capabilities — and the WebSocket's
login, Origin check and live task progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
import websockets

from tests.gateway_env import GatewayRealm, gateway_realm, png

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GatewayRealm]:
    async with gateway_realm(tmp_path_factory.mktemp("gw"), "gwapi") as e:
        yield e


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tokens(env: GatewayRealm) -> dict[str, str]:
    out = {"ops": env.sysop_token}
    async with httpx.AsyncClient(base_url=env.url, headers=env.headers(), timeout=10) as c:
        for name, role in (("ann", "user"), ("bob", "user"), ("gus", "guest")):
            r = await c.post("/api/admin/user_add", json={"args": {"name": name, "role": role}})
            assert r.status_code == 200, r.text
            out[name] = r.json()["token"]
    return out


def client(env: GatewayRealm, token: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=env.url, headers=headers, timeout=15)


def error_of(r: httpx.Response) -> dict[str, Any]:
    """The OpenAI-shaped error every failure carries."""
    assert r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}, err
    assert err["message"], err
    result: dict[str, Any] = err
    return result


async def test_every_route_needs_a_valid_token(env: GatewayRealm) -> None:
    for token in (None, "wrong-token"):
        async with client(env, token) as c:
            for method, path in (
                ("GET", "/api/nodes"),
                ("GET", "/v1/models"),
                ("POST", "/api/tasks"),
            ):
                r = await c.request(method, path, json={"capability": "echo"})
                assert r.status_code == 401, (path, r.text)
                assert error_of(r)["code"] == "unauthorized"
                assert r.headers["www-authenticate"] == "Bearer"


async def test_roles_follow_the_token(env: GatewayRealm, tokens: dict[str, str]) -> None:
    async with client(env, tokens["ann"]) as ann, client(env, tokens["gus"]) as gus:
        assert (await ann.get("/api/whoami")).json() == {"name": "ann", "role": "user"}
        assert (await gus.get("/api/whoami")).json() == {"name": "gus", "role": "guest"}
        for path in ("/api/history",):
            r = await ann.get(path)
            assert r.status_code == 403 and error_of(r)["code"] == "forbidden"
        r = await ann.post("/api/admin/drain", json={"args": {"node": "box"}})
        assert r.status_code == 403
        r = await gus.get("/api/events")
        assert r.status_code == 403, r.text
        assert (await ann.get("/api/events")).status_code == 200
        # a guest's tasks are the guest's: the orchestrator applies the guest's limits
        r = await gus.post("/api/tasks", json={"capability": "echo", "input": 1, "wait": True})
        assert r.status_code == 202 and r.json()["user"] == "gus", r.text


async def test_the_live_picture(env: GatewayRealm, tokens: dict[str, str]) -> None:
    async with client(env, tokens["ann"]) as c:
        nodes = (await c.get("/api/nodes")).json()
        box = next(n for n in nodes if n["node_id"] == "box")
        assert box["online"] and {"echo", "sleep"} <= {cap["name"] for cap in box["capabilities"]}
        assert (await c.get("/api/nodes/box")).json()["node_id"] == "box"
        r = await c.get("/api/nodes/nobody")
        assert r.status_code == 404 and error_of(r)["code"] == "not_found"
        caps = (await c.get("/api/capabilities")).json()
        assert caps["echo"][0]["node_id"] == "box"
        models = (await c.get("/v1/models")).json()
        assert models["object"] == "list"
        assert {"echo", "sleep"} <= {m["id"] for m in models["data"]}
        async with asyncio.timeout(10):  # the orchestrator's stats arrive every second
            while (await c.get("/api/stats")).json()["stats"] is None:
                await asyncio.sleep(0.2)


async def test_tasks_submit_wait_follow_and_cancel(
    env: GatewayRealm, tokens: dict[str, str]
) -> None:
    async with client(env, tokens["ann"]) as ann, client(env, tokens["bob"]) as bob:
        r = await ann.post(
            "/api/tasks", json={"capability": "echo", "input": {"hi": [1, 2]}, "wait": True}
        )
        assert r.status_code == 202, r.text
        done = r.json()
        assert done["status"] == "done" and done["output"] == {"hi": [1, 2]}
        assert done["user"] == "ann" and done["node"] == "box"
        # 202 at once, then follow its updates as server-sent events
        r = await ann.post(
            "/api/tasks",
            json={"capability": "sleep", "input": {"seconds": 0.3, "steps": 3}, "progress": True},
        )
        task_id = r.json()["task_id"]
        statuses = []
        async with ann.stream("GET", f"/api/tasks/{task_id}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    statuses.append(json.loads(line[6:])["status"])
        assert statuses[-1] == "done" and statuses.count("partial") == 3, statuses
        assert "queued" in statuses or "assigned" in statuses, statuses
        assert (await ann.get(f"/api/tasks/{task_id}")).json()["status"] == "done"
        # someone else's task is nobody's business
        assert (await bob.get(f"/api/tasks/{task_id}")).status_code == 404
        assert (await bob.delete(f"/api/tasks/{task_id}")).status_code == 404
        # the queue: ann sees hers only
        r = await ann.post("/api/tasks", json={"capability": "sleep", "input": {"seconds": 20}})
        slow = r.json()["task_id"]
        async with asyncio.timeout(5):
            while not any(t["task_id"] == slow for t in (await ann.get("/api/tasks")).json()):
                await asyncio.sleep(0.3)
        assert all(t["user"] == "bob" for t in (await bob.get("/api/tasks")).json())
        assert (await ann.delete(f"/api/tasks/{slow}")).status_code == 200
        async with asyncio.timeout(10):
            while (await ann.get(f"/api/tasks/{slow}")).json()["status"] != "cancelled":
                await asyncio.sleep(0.1)


async def test_sysop_admin_and_history(env: GatewayRealm, tokens: dict[str, str]) -> None:
    async with client(env, tokens["ops"]) as ops:
        r = await ops.post("/api/admin/drain", json={"args": {"node": "box"}})
        assert r.status_code == 200 and r.json()["drained"] is True, r.text
        r = await ops.post("/api/admin/undrain", json={"args": {"node": "box"}})
        assert r.json()["drained"] is False
        r = await ops.post("/api/admin/blacklist", json={"args": {"node": "nobody"}})
        assert r.status_code == 404 and error_of(r)["code"] == "not_found"
        r = await ops.post("/api/admin/ban", json={"args": {}})
        assert r.status_code == 400 and error_of(r)["code"] == "bad_request"
        r = await ops.post("/api/admin/shutdown", json={"args": {}})
        assert r.status_code == 400  # not an operation
        history = (await ops.get("/api/history", params={"limit": 5})).json()
        assert history and {"task_id", "user", "capability"} <= set(history[0])
        users = (await ops.post("/api/admin/users", json={})).json()
        assert {"sysop", "ann", "gus"} <= {u["name"] for u in users}


async def test_bad_input_is_a_clear_4xx(env: GatewayRealm, tokens: dict[str, str]) -> None:
    async with client(env, tokens["ann"]) as c:
        cases: list[tuple[str, str, Any, int]] = [
            ("POST", "/api/tasks", {"capability": "Not A Name"}, 400),
            ("POST", "/api/tasks", {"capability": "echo", "surprise": 1}, 400),
            ("POST", "/api/tasks", [1, 2, 3], 400),
            ("POST", "/v1/chat/completions", {"messages": []}, 400),
            (
                "POST",
                "/v1/chat/completions",
                {"messages": [{"role": "wizard", "content": "x"}]},
                400,
            ),
            (
                "POST",
                "/v1/chat/completions",
                {"messages": [{"role": "assistant", "content": "no user turn"}]},
                400,
            ),
            ("POST", "/v1/audio/speech", {"input": ""}, 400),
            ("POST", "/v1/audio/speech", {"input": "hi", "response_format": "mp3"}, 400),
            ("POST", "/v1/images/generations", {"prompt": "x", "size": "huge"}, 400),
            ("GET", "/api/events?limit=100000", None, 400),
            ("GET", "/api/nowhere", None, 404),
            ("DELETE", "/api/nodes", None, 405),
        ]
        for method, path, body, status in cases:
            r = await c.request(method, path, json=body)
            assert r.status_code == status, (path, body, r.text)
            error_of(r)
        r = await c.post(
            "/api/tasks", content=b'{"capability": ', headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and error_of(r)["code"] == "bad_request"
        r = await c.post(
            "/api/tasks", content=b"x" * (2 << 20), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413 and error_of(r)["code"] == "too_large"
        files = {"file": ("a.wav", b"this is no wav file", "audio/wav")}
        r = await c.post("/v1/audio/transcriptions", files=files)
        assert r.status_code == 400 and error_of(r)["param"] == "file"


async def test_what_no_peer_offers_is_unavailable_never_faked(
    env: GatewayRealm, tokens: dict[str, str]
) -> None:
    async with client(env, tokens["ann"]) as c:
        r = await c.post("/v1/images/generations", json={"prompt": "a lighthouse at dusk"})
        assert r.status_code == 503 and error_of(r)["code"] == "unavailable", r.text
        r = await c.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        assert r.status_code == 503 and error_of(r)["code"] == "unavailable"
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 503, r.text  # refused before any stream starts
        r = await c.post("/v1/chat/completions", json={**body, "model": "gpt-9"})
        assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"


async def test_the_websocket_pushes_nodes_events_and_task_progress(
    env: GatewayRealm, tokens: dict[str, str]
) -> None:
    ws_url = env.url.replace("http://", "ws://") + "/api/ws"
    host = env.url.removeprefix("http://")
    # another site's page may not use the browser's token
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(ws_url, origin="http://evil.example"):  # type: ignore[arg-type]
            pass
    async with websockets.connect(ws_url) as ws:
        await ws.send(json.dumps({"token": "wrong"}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    async with websockets.connect(ws_url, origin=f"http://{host}") as ws:  # type: ignore[arg-type]
        await ws.send(json.dumps({"token": tokens["ann"]}))
        snap = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert snap["kind"] == "snapshot" and snap["data"]["me"]["name"] == "ann"
        assert "box" in {n["node_id"] for n in snap["data"]["nodes"]}
        async with client(env, tokens["ann"]) as c:
            r = await c.post("/api/tasks", json={"capability": "echo", "input": "via ws"})
        task_id = r.json()["task_id"]
        async with asyncio.timeout(10):
            while True:
                msg = json.loads(await ws.recv())
                if msg["kind"] == "task" and msg["data"]["task_id"] == task_id:
                    assert msg["data"]["status"] == "done" and msg["data"]["output"] == "via ws"
                    assert "key" not in msg["data"]
                    break


async def test_openapi_document_and_docs_page(env: GatewayRealm) -> None:
    async with httpx.AsyncClient(base_url=env.url, timeout=10) as c:
        doc = (await c.get("/openapi.json")).json()
        for path in (
            "/v1/chat/completions",
            "/v1/audio/transcriptions",
            "/api/tasks",
            "/api/nodes",
        ):
            assert path in doc["paths"], path
        assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        page = await c.get("/docs")
        assert (
            page.status_code == 200
            and "default-src 'self'" in page.headers["content-security-policy"]
        )
        index = await c.get("/")
        assert index.status_code == 200 and "<html" in index.text.lower()
        for asset in ("/static/app.js", "/static/style.css"):
            assert (await c.get(asset)).status_code == 200, asset


async def test_the_gateway_account_writes_only_as_itself(env: GatewayRealm) -> None:
    """Under the generated ACL the gateway's own broker account may not pose as a node,
    set realm state or submit as someone else (the broker refuses the publish)."""
    from daemon.bus import Bus
    from daemon.errors import BusPublishError

    cfg = env.configs["gateway"]
    bus = Bus(cfg.broker, "test-gw-acl", password=cfg.broker_password())
    task = asyncio.create_task(bus.run())
    try:
        await bus.wait_connected(10)
        root = f"mtor/{env.realm}"
        for topic in (
            f"{root}/node/box/info",
            f"{root}/state/armed/set/gateway",
            f"{root}/task/submit/admin",
            f"{root}/media/box/stt/x",
            f"{root}/reply/admin/x/tasks",
        ):
            with pytest.raises(BusPublishError):
                await bus.publish(topic, b"{}", qos=1)
        await bus.publish(f"{root}/media/gateway/stt/probe", b"", qos=1)  # its own: allowed
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_camera_snapshots_are_served_to_users_not_guests(
    env: GatewayRealm, tokens: dict[str, str]
) -> None:
    picture = png()
    topic = f"mtor/{env.realm}/media/cam/door/snapshot"
    async with env.account_bus("cam") as cam, client(env, tokens["ann"]) as ann:
        await cam.publish(topic, picture, retain=True, content_type="image/png")
        await cam.publish(  # not a picture: ignored
            f"mtor/{env.realm}/media/cam/bell/snapshot",
            b"x",
            retain=True,
            content_type="text/plain",
        )
        async with asyncio.timeout(10):
            while not (await ann.get("/api/snapshots")).json():
                await asyncio.sleep(0.05)
        listed = (await ann.get("/api/snapshots")).json()
        assert [(s["node_id"], s["camera"], s["bytes"]) for s in listed] == [
            ("cam", "door", len(picture))
        ]
        r = await ann.get("/api/snapshots/cam/door")
        assert r.status_code == 200 and r.content == picture
        assert r.headers["content-type"] == "image/png"
        assert (await ann.get("/api/snapshots/cam/bell")).status_code == 404
        async with client(env, tokens["gus"]) as gus:
            assert (await gus.get("/api/snapshots/cam/door")).status_code == 403
        await cam.publish(topic, b"", retain=True)  # cleared: gone
        async with asyncio.timeout(10):
            while (await ann.get("/api/snapshots")).json():
                await asyncio.sleep(0.05)
