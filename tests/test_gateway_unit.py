"""Pure parts of the gateway and its account: the ``gateway`` role's ACL, whom the
orchestrator lets it act for, tokens, audio, Origin checks, the hub's audiences."""

from __future__ import annotations

import asyncio
import io
import json
import math
import socket
import struct
import wave
from pathlib import Path

import pytest

from daemon.accounts import ROLES, Account, Accounts
from daemon.gateway import audio
from daemon.gateway.auth import Principal, TokenBook, bearer
from daemon.gateway.hub import SUBSCRIBER_QUEUE, Hub
from daemon.gateway.server import listen
from daemon.gateway.ws import origin_allowed
from daemon.orchestrator.config import OrchestratorConfig
from daemon.orchestrator.identity import Identities, Refused
from daemon.orchestrator.users import Users
from daemon.protocol.node import Event, NodeState
from daemon.provision import acl


def test_the_gateway_role_reads_like_a_user_and_writes_only_as_itself() -> None:
    assert "gateway" in ROLES
    rules = {(r.access, r.topic) for r in acl.rules(Account("gw", "gateway"), "home")}
    writes = {t for a, t in rules if a != "read"}
    assert writes == {
        "mtor/home/task/submit/gw",
        "mtor/home/task/control/gw",
        "mtor/home/orchestrator/admin/gw",
        "mtor/home/reply/gw/#",
        "mtor/home/workflows/request/gw",
        "mtor/home/media/gw/#",
    }
    reads = {t for a, t in rules if a == "read"}
    assert "mtor/home/event/#" in reads and "mtor/home/node/+/info" in reads
    text = " ".join(t for _, t in rules)
    for never in ("task/submit/+", "node/+/task", "state/+/set", "cmd", "homeassistant"):
        assert never not in text, never


@pytest.fixture
async def identities(tmp_path: Path) -> Identities:
    accounts = Accounts(tmp_path / "accounts.json", "home")
    for name, role in (("gw", "gateway"), ("ann", "user"), ("orchestrator", "orchestrator")):
        accounts.add(name, role)  # type: ignore[arg-type]
    users = Users(tmp_path / "users.json")
    ids = Identities(OrchestratorConfig(state_dir=tmp_path), users, accounts)
    ids.tokens = {  # type: ignore[attr-defined]
        "ops": await users.add("ops", "sysop"),
        "bob": await users.add("bob", "user"),
        "gus": await users.add("gus", "guest"),
    }
    return ids


async def test_the_gateway_acts_only_for_the_user_of_a_token_it_relays(
    identities: Identities,
) -> None:
    tokens = identities.tokens  # type: ignore[attr-defined]
    # the token decides who and which role; the name written beside it counts for nothing
    for name, role in (("ops", "sysop"), ("bob", "user"), ("gus", "guest")):
        ident = identities.identify("gw", tokens[name], on_behalf="someone-else")
        assert (ident.name, ident.role) == (name, role)
    with pytest.raises(Refused) as no_token:
        identities.identify("gw", None, on_behalf="ops")
    assert no_token.value.code == "unauthorized"
    with pytest.raises(Refused) as bad:
        identities.identify("gw", "not-a-token", on_behalf="ops")
    assert bad.value.code == "unauthorized"
    # a user account may not act for others, even with a token it learnt
    assert identities.identify("ann", tokens["ops"], on_behalf="ops").name == "ann"
    # the orchestrator still may (workflow runs), never with sysop rights by name
    assert identities.identify("orchestrator", None, on_behalf="ops").role != "sysop"


async def test_a_banned_users_token_is_refused_through_the_gateway(
    identities: Identities,
) -> None:
    await identities.users.set_ban("bob", True, "spam")
    with pytest.raises(Refused) as info:
        identities.identify("gw", identities.tokens["bob"])  # type: ignore[attr-defined]
    assert info.value.code == "banned"


async def test_the_token_book_follows_the_users_file(tmp_path: Path) -> None:
    users = Users(tmp_path / "users.json")
    book = TokenBook(tmp_path / "users.json")
    assert book.lookup("anything", now=0.0) is None  # no file yet
    token = await users.add("ann", "user")
    found = book.lookup(token, now=100.0)
    assert found == Principal("ann", "user", token)
    device = await users.add("cam", "device")
    assert book.lookup(device, now=200.0) == Principal("cam", "node", device)
    await users.set_ban("ann", True)
    assert book.lookup(token, now=300.0) is None
    assert book.lookup("x" * 300, now=301.0) is None and book.lookup("", now=301.0) is None
    (tmp_path / "users.json").write_text("{broken")
    assert book.lookup(device, now=400.0) is None  # unreadable: nobody, never a crash
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None and bearer(None) is None and bearer("Bearer ") is None


def _wav(rate: int, channels: int, width: int, seconds: float = 0.5) -> bytes:
    out = io.BytesIO()
    n = int(rate * seconds)
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        frames = bytearray()
        for i in range(n):
            v = math.sin(2 * math.pi * 440 * i / rate) * 0.5
            for _ in range(channels):
                if width == 1:
                    frames += bytes([int(128 + v * 127)])
                elif width == 2:
                    frames += struct.pack("<h", int(v * 32767))
                else:
                    frames += int(v * (2 ** (8 * width - 1) - 1)).to_bytes(
                        width, "little", signed=True
                    )
        w.writeframes(bytes(frames))
    return out.getvalue()


@pytest.mark.parametrize(
    ("rate", "channels", "width"), [(16000, 1, 2), (44100, 2, 2), (8000, 1, 1), (48000, 1, 3)]
)
def test_any_pcm_wav_becomes_16k_mono(rate: int, channels: int, width: int) -> None:
    pcm = audio.wav_to_pcm16k(_wav(rate, channels, width))
    assert len(pcm) == 2 * (16000 * int(rate * 0.5) // rate)
    peak = max(abs(v) for v in struct.unpack(f"<{len(pcm) // 2}h", pcm))
    assert 12000 < peak < 20000  # the sine's amplitude survives mixing and resampling
    back = audio.pcm_to_wav(pcm)
    with wave.open(io.BytesIO(back)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)


def test_what_is_not_a_wav_is_a_clear_error() -> None:
    for junk in (b"", b"RIFF", b"not audio at all" * 10, _wav(16000, 1, 2)[:30]):
        with pytest.raises(audio.AudioError):
            audio.wav_to_pcm16k(junk)


def test_the_listening_socket_says_tcp_so_asyncio_sets_nodelay() -> None:
    # with proto 0 asyncio leaves Nagle on, and every small answer waited ~40 ms
    sock = listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_websocket_origin_must_be_the_gateways_own() -> None:
    assert origin_allowed(None, "127.0.0.1:8080", [])  # not a browser
    assert origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080", [])
    assert not origin_allowed("http://evil.example", "127.0.0.1:8080", [])
    assert not origin_allowed("http://127.0.0.1:8081", "127.0.0.1:8080", [])
    assert not origin_allowed("null", "127.0.0.1:8080", [])
    assert origin_allowed("https://panel.lan", "127.0.0.1:8080", ["https://panel.lan"])


async def test_the_hub_shows_each_principal_what_its_role_may_see() -> None:
    hub = Hub()
    sysop = hub.subscribe(Principal("ops", "sysop", "t1"))
    user = hub.subscribe(Principal("ann", "user", "t2"))
    guest = hub.subscribe(Principal("gus", "guest", "t3"))
    hub.on_state("kitchen", NodeState(state="online", boot_id="b1"))
    hub.on_event("kitchen", "sensor", "temperature", Event(value=21.5))
    from daemon.protocol.task import TaskUpdate

    hub.on_task("ann", "echo", TaskUpdate(task_id="t-1", status="done", output=1, key="secret"))

    def kinds(sub: object) -> list[str]:
        q = sub.queue  # type: ignore[attr-defined]
        return [json.loads(q.get_nowait())["kind"] for _ in range(q.qsize())]

    assert kinds(sysop) == ["node", "event", "task"]
    assert kinds(user) == ["node", "event", "task"]
    assert kinds(guest) == ["node"]  # no events, and not ann's task
    assert "secret" not in json.dumps(list(hub.events))
    # a slow client loses its oldest messages, never the gateway's memory
    for i in range(SUBSCRIBER_QUEUE + 10):
        hub.on_event("kitchen", "sensor", "n", Event(value=i))
    assert user.queue.qsize() == SUBSCRIBER_QUEUE and user.dropped == 10
    await asyncio.sleep(0)
