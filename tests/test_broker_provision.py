"""The generated broker configuration (``mtor broker``, daemon.provision): the ACL
as text, then a real Mosquitto run from a generated directory, probed as every
role — what each may read and write, what it may not — and TLS, revocation,
the client files; and ``mtor up``, closed by default.

Mosquitto 2 acknowledges every SUBSCRIBE and filters at delivery, so a read
check is about what is delivered.  A "never delivered" check never just
sleeps: after the probe the same publisher sends a sentinel that the reader
surely receives, and the broker keeps one publisher's messages in order, so
once the sentinel is in, the probe would have been too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import topics
from daemon.accounts import ROLES, Account
from daemon.broker import PrivateBroker, free_port, port_open
from daemon.bus import Bus, Inbound
from daemon.cli.up import broker_named
from daemon.config import BrokerConfig, build_config, default_node_id, load_config
from daemon.errors import BusAuthError, BusPublishError, ConfigError
from daemon.homeassistant.bridge import device_id
from daemon.messages import decode
from daemon.mqtt import ConnectionLost, ConnectParams, ConnectRefused, MqttError, connect
from daemon.protocol.node import NodeInfo
from daemon.provision import acl, passwd
from daemon.provision.brokerdir import BrokerDir, UsageError
from daemon.provision.conf import BrokerSettings
from tests.conftest import Collector, MtorProcess, make_config, mtor_env, running_bus

REALM = "prov"
R = f"mtor/{REALM}"
HA = "homeassistant"
# Accounts of the broker under test: name -> role.
ACCOUNTS: dict[str, Any] = {
    "alice": "user",
    "bob": "user",
    "visitor": "guest",
    "kitchen": "node",
    "hall": "node",
    "ha": "homeassistant",
}
# A topic each account can write and the orchestrator reads (the sentinel of a
# write check, whose reader is the orchestrator).
OWN_WRITE = {
    "admin": f"{R}/task/submit/admin",
    "alice": f"{R}/task/submit/alice",
    "bob": f"{R}/task/submit/bob",
    "visitor": f"{R}/task/submit/visitor",
    "kitchen": f"{R}/node/kitchen/health",
    "hall": f"{R}/node/hall/health",
    "ha": f"{HA}/status",
}
WAIT = 5.0  # seconds any one delivery may take


# ------------------------------------------------------------------ unit tests


def test_every_role_renders_its_own_name_and_nothing_for_anonymous() -> None:
    accounts = [Account(f"{role}1", role) for role in ROLES]
    text = acl.render(accounts, "home")
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines[0].startswith("user "), "a rule before the first user line binds anonymous"
    assert "pattern" not in text and "%u" not in text and "%c" not in text
    for role in ROLES:
        assert f"user {role}1" in lines
        rules = acl.rules(Account(f"{role}1", role), "home")
        assert rules, role
        assert all(r.topic.startswith(("mtor/home/", "homeassistant/", "$SYS/")) for r in rules)


def test_writes_name_the_writer_except_for_the_orchestrator_and_people_commands() -> None:
    # Every write of a node, user or guest that carries an identity carries its own.
    for name, role in (("n1", "node"), ("u1", "user"), ("g1", "guest")):
        for r in acl.rules(Account(name, role), "home"):
            if r.access == "read":
                continue
            # shared: entity commands, run events, and direct finals (keyed, see client)
            shared = r.topic.endswith(("/entity/+/set", "workflow/+/event", "/+/+/direct"))
            assert shared or name in r.topic or device_id("home", name) in r.topic, (role, r)


def test_guest_and_homeassistant_get_exactly_their_topics() -> None:
    guest = {(r.access, r.topic) for r in acl.rules(Account("g", "guest"), "home")}
    assert guest == {
        ("read", "mtor/home/node/+/state"),
        ("read", "mtor/home/node/+/info"),
        ("read", "mtor/home/orchestrator/state"),
        ("write", "mtor/home/task/submit/g"),
        ("write", "mtor/home/task/control/g"),
        ("write", "mtor/home/orchestrator/admin/g"),
        ("readwrite", "mtor/home/reply/g/#"),
    }
    ha = acl.rules(Account("ha", "homeassistant"), "home", "hass")
    topics = " ".join(r.topic for r in ha)
    for never in ("task", "reply", "orchestrator/admin", "workflows", "cli"):
        assert f"/{never}" not in topics, never
    assert ("read", "hass/#") in {(r.access, r.topic) for r in ha}
    assert ("write", "hass/status") in {(r.access, r.topic) for r in ha}


def test_node_discovery_rule_uses_the_bridges_device_id() -> None:
    rules = {(r.access, r.topic) for r in acl.rules(Account("kitchen.1", "node"), "home")}
    assert ("write", "homeassistant/+/mtor_home_kitchen_1/#") in rules
    assert device_id("home", "kitchen.1") == "mtor_home_kitchen_1"


def test_password_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    pwfile = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pwfile), "u", "s3cret"], check=True)
    theirs = passwd.parse(pwfile.read_text())["u"]
    assert theirs.startswith(f"$7${passwd.ITERATIONS}$")
    assert passwd.verify("s3cret", theirs) and not passwd.verify("other", theirs)
    ours = passwd.hash_password("s3cret")
    assert passwd.verify("s3cret", ours) and ours != passwd.hash_password("s3cret")  # salted


def test_settings_round_trip() -> None:
    s = BrokerSettings(realm="r", hosts=["a"], data_dir=Path("/d"), pid_file=Path("/d/p"))
    assert BrokerSettings.from_json(s.to_json()) == s


def test_directory_refuses_bad_names_and_duplicates(tmp_path: Path) -> None:
    d = BrokerDir.init(tmp_path / "b", "home", tls_port=None)
    assert {a.name: a.role for a in d.accounts().all()} == {
        "orchestrator": "orchestrator",
        "admin": "sysop",
    }
    d.add("kitchen.1", "node")
    with pytest.raises(UsageError, match="exists"):
        d.add("kitchen.1", "node")
    with pytest.raises(UsageError, match="Home Assistant id"):
        d.add("kitchen_1", "node")  # the same HA device id
    with pytest.raises(UsageError, match="realm device"):
        d.add("realm", "node")
    with pytest.raises(UsageError, match="invalid"):
        d.add("a/b", "user")
    with pytest.raises(UsageError, match="is a node"):
        d.add("kitchen.1", "user", rotate=True)
    with pytest.raises(UsageError, match="already"):
        BrokerDir.init(tmp_path / "b", "home")
    with pytest.raises(ConfigError, match="not a broker directory"):
        BrokerDir(tmp_path / "none").settings()
    old = d.password("kitchen.1")
    assert d.add("kitchen.1", None, rotate=True).password != old
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "b").iterdir()}
    assert modes["clients"] == 0o700 and modes["passwd"] == 0o600 and modes["acl"] == 0o600
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o700


# ------------------------------------------------------------- a real broker


@pytest.fixture(scope="module")
def realm_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerDir, int]]:
    """A broker directory with one account of every role, and its Mosquitto."""
    path = tmp_path_factory.mktemp("prov") / "broker"
    tls_port = free_port()
    d = BrokerDir.init(path, REALM, port=free_port(), tls_port=tls_port, hosts=["localhost"])
    for name, role in ACCOUNTS.items():
        d.add(name, role)
    broker = PrivateBroker.generated(d.conf_file, d.settings().port)
    broker.start()
    try:
        yield d, tls_port
    finally:
        broker.cleanup()


class Client:
    """One account's connection and everything it received."""

    def __init__(self, name: str, bus: Bus) -> None:
        self.name = name
        self.bus = bus
        self.got = Collector()

    async def sub(self, *filters: str) -> None:
        for f in filters:
            await self.bus.subscribe(f, self.got)

    def has(self, payload: bytes) -> bool:
        return any(m.payload == payload for m in self.got.messages)

    async def wait(self, payload: bytes) -> Inbound:
        return await self.got.wait_for(lambda m: m.payload == payload, timeout=WAIT)


@contextlib.asynccontextmanager
async def session(
    d: BrokerDir, name: str, url: str | None = None, **broker: Any
) -> AsyncIterator[Client]:
    cfg = BrokerConfig(url=url or f"mqtt://127.0.0.1:{d.settings().port}", username=name, **broker)
    bus = Bus(cfg, f"test-{name}-{uuid.uuid4().hex[:6]}", password=d.password(name))
    task = asyncio.create_task(bus.run())
    try:
        waiter = asyncio.create_task(bus.wait_connected(WAIT))
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            waiter.cancel()
            task.result()
        await waiter
        yield Client(name, bus)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


@pytest.fixture
async def clients(
    realm_broker: tuple[BrokerDir, int],
) -> AsyncIterator[dict[str, Client]]:
    d, _ = realm_broker
    async with contextlib.AsyncExitStack() as stack:
        out = {}
        for name in ("orchestrator", "admin", *ACCOUNTS):
            out[name] = await stack.enter_async_context(session(d, name))
        yield out


def token() -> bytes:
    return f"probe-{uuid.uuid4().hex}".encode()


async def publish(c: Client, topic: str, payload: bytes, retain: bool = False) -> bool:
    """Publish at QoS 1; False when the broker refused it (PUBACK 0x87)."""
    try:
        await c.bus.publish(topic, payload, qos=1, retain=retain)
    except BusPublishError:
        return False
    return True


async def delivered(writer: Client, reader: Client, topic: str, sub: str | None = None) -> bool:
    """Does ``reader`` (subscribed to ``sub``, default ``topic``) get what ``writer``
    publishes on ``topic``?  One side is the orchestrator, which reads and writes
    everything: the sentinel goes from writer to reader on a topic both may use."""
    if writer.name == "orchestrator":
        # Home Assistant has no reply topics: its sentinel is under its discovery prefix
        own = f"{HA}/sentinel" if reader.name == "ha" else f"{R}/reply/{reader.name}"
        sentinel_topic = f"{own}/sentinel"
    else:
        assert reader.name == "orchestrator", "a negative check needs the orchestrator"
        sentinel_topic = OWN_WRITE[writer.name]
    await reader.sub(sub or topic, sentinel_topic)
    probe, sentinel = token(), token()
    accepted = await publish(writer, topic, probe)
    assert await publish(writer, sentinel_topic, sentinel)
    await reader.wait(sentinel)
    received = reader.has(probe)
    if writer.name == "orchestrator":
        return received  # a read check
    return received or accepted  # a write check: the broker must also have said no


async def may_not_write(writer: Client, topic: str, orchestrator: Client) -> bool:
    """True when the broker refuses the publish (PUBACK "not authorized") and
    nobody, not even the orchestrator that reads everything, receives it."""
    return not await delivered(writer, orchestrator, topic)


async def may_not_read(reader: Client, topic: str, sub: str | None, orchestrator: Client) -> bool:
    """True when what the orchestrator publishes on ``topic`` never reaches ``reader``."""
    return not await delivered(orchestrator, reader, topic, sub)


async def allowed(writer: Client, reader: Client, topic: str, sub: str | None = None) -> None:
    await reader.sub(sub or topic)
    probe = token()
    assert await publish(writer, topic, probe), f"{writer.name} may write {topic}"
    await reader.wait(probe)


async def test_anonymous_and_wrong_passwords_are_refused(
    realm_broker: tuple[BrokerDir, int],
) -> None:
    d, _ = realm_broker
    port = d.settings().port
    for username, password in ((None, None), ("alice", "wrong"), ("nobody", "x")):
        params = ConnectParams("127.0.0.1", port, "anon", username=username, password=password)
        with pytest.raises(ConnectRefused) as info:
            conn = await connect(params)
            await conn.close()
        assert info.value.code in (0x86, 0x87), info.value


async def test_what_each_role_may_do(clients: dict[str, Client]) -> None:
    c = clients
    orch, admin, alice, visitor, kitchen, hall, ha = (
        c[n] for n in ("orchestrator", "admin", "alice", "visitor", "kitchen", "hall", "ha")
    )
    # a node's presence, advert and health: to every watcher (guests: state and info)
    for kind in ("state", "info", "health"):
        for reader in (orch, admin, alice, hall, ha):
            await allowed(kitchen, reader, f"{R}/node/kitchen/{kind}", f"{R}/node/+/{kind}")
    for kind in ("state", "info"):
        await allowed(kitchen, visitor, f"{R}/node/kitchen/{kind}", f"{R}/node/+/{kind}")
    # events and media: to the orchestrator, sysop, users, nodes and Home Assistant
    for reader in (orch, admin, alice, hall, ha):
        await allowed(kitchen, reader, f"{R}/event/kitchen/sensor/temp", f"{R}/event/#")
        await allowed(kitchen, reader, f"{R}/media/kitchen/cam/snapshot", f"{R}/media/#")
    # tasks: a node hears its own assignments and answers as itself
    await allowed(orch, kitchen, f"{R}/node/kitchen/task")
    await allowed(kitchen, orch, f"{R}/task/worker/kitchen")
    # requests under one's own name; replies to one's own topics
    for who in (alice, visitor, kitchen, admin):
        for kind in ("task/submit", "task/control", "orchestrator/admin"):
            await allowed(who, orch, f"{R}/{kind}/{who.name}", f"{R}/{kind}/+")
        await allowed(orch, who, f"{R}/reply/{who.name}/t1/done", f"{R}/reply/{who.name}/#")
        await allowed(who, who, f"{R}/reply/{who.name}/cli/x")  # the CLI's sentinel
    for who in (alice, kitchen, admin):
        await allowed(who, orch, f"{R}/workflows/request/{who.name}", f"{R}/workflows/request/+")
    # a node takes runs only as the orchestrator hands them on, never others' requests
    await allowed(orch, hall, f"{R}/workflows/request/orchestrator")
    assert await may_not_read(
        hall, f"{R}/workflows/request/alice", f"{R}/workflows/request/+", orch
    )
    await allowed(kitchen, alice, f"{R}/workflow/wf1/event", f"{R}/workflow/+/event")
    # a direct final (it counts only with the submitter's reply key: daemon.client)
    await allowed(kitchen, alice, f"{R}/reply/alice/t1/direct", f"{R}/reply/alice/#")
    # the orchestrator's state (everyone) and the realm state (not guests)
    for reader in (admin, alice, visitor, kitchen, ha):
        await allowed(orch, reader, f"{R}/orchestrator/state")
    for reader in (admin, alice, kitchen, ha):
        await allowed(orch, reader, f"{R}/state/armed", f"{R}/state/+")
    for who in (alice, kitchen, ha, admin):
        await allowed(who, orch, f"{R}/state/armed/set/{who.name}", f"{R}/state/+/set/+")
    # commands to a node's entities and to the node itself
    for who in (orch, admin, alice, ha):
        await allowed(who, kitchen, f"{R}/node/kitchen/entity/light/set")
    for who in (orch, admin, ha):
        await allowed(who, kitchen, f"{R}/node/kitchen/cmd/restart", f"{R}/node/kitchen/cmd/#")
    # Home Assistant: a node's own discovery configs, HA's birth
    haid = device_id(REALM, "kitchen")
    await allowed(kitchen, ha, f"{HA}/sensor/{haid}/temp/config", f"{HA}/#")
    await allowed(orch, ha, f"{HA}/alarm_control_panel/mtor_{REALM}_realm/armed/config", f"{HA}/#")
    for reader in (kitchen, orch):
        await allowed(ha, reader, f"{HA}/status")
    # the sysop reads everything of the realm, other people's requests included
    await allowed(alice, admin, f"{R}/task/submit/alice", f"{R}/#")


async def test_what_users_may_not_do(clients: dict[str, Client]) -> None:
    orch, alice = clients["orchestrator"], clients["alice"]
    for topic in (
        f"{R}/node/kitchen/info",
        f"{R}/node/alice/state",
        f"{R}/task/worker/kitchen",
        f"{R}/event/kitchen/sensor/temp",
        f"{R}/event/alice/sensor/temp",
        f"{R}/media/alice/cam/x",
        f"{R}/task/submit/bob",  # impersonation
        f"{R}/reply/bob/t1/done",
        f"{R}/state/armed",
        f"{R}/state/armed/set/bob",
        f"{R}/node/kitchen/cmd/restart",
        f"{R}/orchestrator/state",
        f"{HA}/status",
    ):
        assert await may_not_write(alice, topic, orch), topic
    for topic, sub in (
        (f"{R}/task/submit/bob", f"{R}/task/submit/+"),
        (f"{R}/reply/bob/t1/done", f"{R}/reply/+/#"),
        (f"{R}/node/kitchen/task", None),
        (f"{R}/task/worker/kitchen", f"{R}/task/#"),
        (f"{R}/orchestrator/admin/bob", f"{R}/orchestrator/#"),
        (f"{HA}/sensor/x/y/config", f"{HA}/#"),
    ):
        assert await may_not_read(alice, topic, sub, orch), topic


async def test_what_nodes_may_not_do(clients: dict[str, Client]) -> None:
    orch, kitchen = clients["orchestrator"], clients["kitchen"]
    hall_ha = device_id(REALM, "hall")
    for topic in (
        f"{R}/node/hall/state",
        f"{R}/node/hall/info",
        f"{R}/event/hall/sensor/temp",
        f"{R}/media/hall/cam/x",
        f"{R}/task/worker/hall",
        f"{R}/task/submit/hall",
        f"{R}/reply/alice/t1/done",
        f"{R}/reply/alice/t1/tasks",
        f"{R}/reply/alice/t1/direct/x",
        f"{R}/state/armed",
        f"{R}/node/hall/task",
        f"{R}/node/hall/cmd/restart",
        f"{R}/orchestrator/state",
        f"{HA}/sensor/{hall_ha}/temp/config",
        f"{HA}/alarm_control_panel/mtor_{REALM}_realm/armed/config",
        f"{HA}/status",
    ):
        assert await may_not_write(kitchen, topic, orch), topic
    for topic, sub in (
        (f"{R}/task/submit/alice", f"{R}/task/submit/+"),
        (f"{R}/node/hall/task", f"{R}/node/+/task"),
        (f"{R}/node/hall/cmd/restart", f"{R}/node/+/cmd/#"),
        (f"{R}/reply/alice/t1/done", f"{R}/reply/#"),
        (f"{R}/state/armed/set/alice", f"{R}/state/#"),
    ):
        assert await may_not_read(kitchen, topic, sub, orch), topic


async def test_what_home_assistant_and_guests_may_not_do(clients: dict[str, Client]) -> None:
    orch, ha, visitor, admin = (clients[n] for n in ("orchestrator", "ha", "visitor", "admin"))
    for topic, sub in (
        (f"{R}/task/submit/alice", f"{R}/task/#"),
        (f"{R}/task/worker/kitchen", f"{R}/task/#"),
        (f"{R}/node/kitchen/task", f"{R}/node/+/task"),
        (f"{R}/reply/alice/t1/done", f"{R}/reply/#"),
        (f"{R}/reply/ha/t1/done", f"{R}/reply/#"),
        (f"{R}/orchestrator/admin/alice", f"{R}/orchestrator/admin/#"),
        (f"{R}/workflows/request/alice", f"{R}/workflows/#"),
        (f"{R}/orchestrator/stats", None),
    ):
        assert await may_not_read(ha, topic, sub, orch), topic
    for topic in (
        f"{R}/task/submit/ha",
        f"{R}/node/kitchen/state",
        f"{R}/node/kitchen/cmd/shutdown",
        f"{R}/state/armed",
        f"{R}/state/armed/set/alice",
        f"{R}/event/ha/x/y",
        f"{HA}/sensor/{device_id(REALM, 'kitchen')}/temp/config",
    ):
        assert await may_not_write(ha, topic, orch), topic
    for topic, sub in (
        (f"{R}/event/kitchen/sensor/temp", f"{R}/event/#"),
        (f"{R}/media/kitchen/cam/x", f"{R}/media/#"),
        (f"{R}/state/armed", f"{R}/state/+"),
        (f"{R}/node/kitchen/health", f"{R}/node/+/health"),
        (f"{R}/reply/alice/t1/done", f"{R}/reply/#"),
        (f"{R}/workflow/wf1/event", f"{R}/workflow/+/event"),
    ):
        assert await may_not_read(visitor, topic, sub, orch), topic
    for topic in (
        f"{R}/node/kitchen/entity/light/set",
        f"{R}/task/submit/alice",
        f"{R}/state/armed/set/visitor",
        f"{R}/workflows/request/visitor",
    ):
        assert await may_not_write(visitor, topic, orch), topic
    # the sysop reads everything but writes only as itself and the commands
    for topic in (f"{R}/node/kitchen/state", f"{R}/state/armed", f"{R}/task/submit/alice"):
        assert await may_not_write(admin, topic, orch), topic


async def test_retained_and_sys_topics_follow_the_acl(clients: dict[str, Client]) -> None:
    orch, admin, alice = clients["orchestrator"], clients["admin"], clients["alice"]
    await publish(orch, f"{R}/task/submit/secret-retained", b"hidden", retain=True)
    await publish(orch, f"{R}/reply/alice/sentinel-retained", b"sentinel", retain=True)
    try:
        # retained messages are delivered on subscribe, in subscription order
        await alice.sub(f"{R}/task/#", "$SYS/broker/version")
        await alice.sub(f"{R}/reply/alice/sentinel-retained")
        await alice.wait(b"sentinel")
        assert not alice.has(b"hidden")
        assert not any(m.topic.startswith("$SYS") for m in alice.got.messages)
        await admin.sub("$SYS/broker/version")
        version = await admin.got.wait_for(lambda m: m.topic == "$SYS/broker/version", WAIT)
        assert b"mosquitto" in version.payload
    finally:
        await publish(orch, f"{R}/task/submit/secret-retained", b"", retain=True)
        await publish(orch, f"{R}/reply/alice/sentinel-retained", b"", retain=True)


async def test_tls_listener_with_the_generated_ca(realm_broker: tuple[BrokerDir, int]) -> None:
    d, tls_port = realm_broker
    url = f"mqtts://localhost:{tls_port}"
    ca = d.client_dir("kitchen") / "ca.crt"
    async with session(d, "kitchen", url, tls={"ca_file": str(ca)}) as c:
        await allowed(c, c, f"{R}/event/kitchen/tls/check", f"{R}/event/kitchen/#")
    # a CA that did not sign the broker's certificate: the handshake fails
    other = BrokerDir.init(d.path.parent / "other", "x")
    ctx = ssl.create_default_context(cafile=str(other.path / "ca.crt"))
    params = ConnectParams("localhost", tls_port, "t-badca", tls=ctx, username="kitchen")
    with pytest.raises(ConnectionLost, match="certificate verify failed"):
        await connect(params)


async def test_generated_client_config_loads_and_connects(
    realm_broker: tuple[BrokerDir, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, tls_port = realm_broker
    monkeypatch.chdir(d.client_dir("hall"))  # a device runs mtor from inside its directory
    config, used = load_config("config.yaml", {})
    assert used is not None
    assert config.effective_node_id == "hall" and config.realm == REALM
    assert config.broker.url == f"mqtts://localhost:{tls_port}"
    bus = Bus(config.broker, "test-hall-cfg", password=config.broker_password())
    task = asyncio.create_task(bus.run())
    try:
        await bus.wait_connected(WAIT)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    orch_cfg, _ = load_config(str(d.client_dir("orchestrator") / "config.yaml"), {})
    assert orch_cfg.broker.url == f"mqtt://127.0.0.1:{d.settings().port}"
    assert orch_cfg.orchestrator.accounts_file == d.accounts_file
    assert orch_cfg.broker_password() == d.password("orchestrator")


async def test_rotated_and_revoked_accounts_after_sighup(
    realm_broker: tuple[BrokerDir, int],
) -> None:
    d, _ = realm_broker
    d.add("temp", "user")
    assert d.reload() is not None
    async with asyncio.timeout(WAIT):
        while True:  # the broker rereads its files on SIGHUP, asynchronously
            try:
                async with session(d, "temp"):
                    break
            except BusAuthError:
                await asyncio.sleep(0.05)
    port = d.settings().port
    # rotated: the old password's session is closed, the new password works
    old = ConnectParams("127.0.0.1", port, "t-old", username="temp", password=d.password("temp"))
    held = await connect(old)
    d.add("temp", None, rotate=True)
    assert d.reload() is not None
    with pytest.raises(MqttError):
        async with asyncio.timeout(WAIT):
            await held.wait_message()
    with pytest.raises(ConnectRefused):
        await connect(old)
    password = d.password("temp")
    params = ConnectParams("127.0.0.1", port, "t-revoked", username="temp", password=password)
    held = await connect(params)
    d.revoke("temp")
    assert d.reload() is not None
    # the broker drops the revoked account's open connection too
    with pytest.raises(MqttError):
        async with asyncio.timeout(WAIT):
            await held.wait_message()
    async with asyncio.timeout(WAIT):
        while True:
            try:
                conn = await connect(params)
            except ConnectRefused as exc:
                assert exc.code in (0x86, 0x87)
                break
            await conn.close()
            await asyncio.sleep(0.05)


# ------------------------------------------------------------------- mtor up


def test_a_broker_counts_as_named_only_when_someone_named_it() -> None:
    none = argparse.Namespace(broker=None)
    assert not broker_named(build_config({}), none, {})
    # the shipped config.yaml spells out the default URL: that names nothing
    assert not broker_named(build_config({"broker": {"url": "mqtt://localhost:1883"}}), none, {})
    assert broker_named(build_config({"broker": {"url": "mqtt://10.0.0.2:1883"}}), none, {})
    assert broker_named(build_config({}), argparse.Namespace(broker="mqtt://x:1883"), {})
    assert broker_named(build_config({}), none, {"MTOR_BROKER": "mqtt://x:1883"})
    assert broker_named(build_config({"broker": {"username": "me"}}), none, {})


async def wait_running(d: BrokerDir, up: MtorProcess, timeout: float = 30) -> int:
    """The port of the broker ``mtor up`` runs from ``d``, once it runs."""
    async with asyncio.timeout(timeout):
        while d.running_pid() is None:  # a process that writes a pid file: nothing to await
            assert up.proc.poll() is None, up.output()
            await asyncio.sleep(0.05)
    return d.settings().port


async def mtor(cwd: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon.cli.main", *args,
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_mtor_up_is_closed_by_default_and_its_cli_needs_no_flags(
    tmp_path: Path, processes: list[MtorProcess]
) -> None:
    env = mtor_env(HOME=str(tmp_path))  # no config file anywhere: the defaults
    up = MtorProcess(["up"], env=env, cwd=tmp_path)
    processes.append(up)
    d = BrokerDir(tmp_path / "state" / "broker")
    port = await wait_running(d, up)
    assert (tmp_path / "state" / "broker").stat().st_mode & 0o777 == 0o700
    assert {a.name: a.role for a in d.accounts().all()} == {
        "orchestrator": "orchestrator",
        "admin": "sysop",
        "gateway": "gateway",
        default_node_id(): "node",
    }
    for f in (d.passwd_file, d.acl_file, d.client_dir("admin") / "password"):
        assert f.stat().st_mode & 0o777 == 0o600, f
    with pytest.raises(ConnectRefused):
        await connect(ConnectParams("127.0.0.1", port, "t-anon"))

    # the README's second terminal: no flags, the CLI finds the admin account
    async with session(d, "admin") as admin:
        infos = Collector()
        await admin.bus.subscribe(topics.NODE_INFO.filter(realm="home"), infos)

        def offers_echo(m: Inbound) -> bool:
            return any(c.name == "echo" for c in decode(m.payload, NodeInfo).capabilities)

        await infos.wait_for(offers_echo, timeout=90)  # the node loads its models first
    rc, out, err = await mtor(tmp_path, env, "ask", "echo", "hi")
    assert rc == 0, err
    assert out.strip() == "hi"
    rc, out, err = await mtor(tmp_path, env, "status", "--json")
    status_ok = rc == 0 and default_node_id() in out

    rc, log = up.terminate(timeout=30)
    assert rc == 0, log
    assert "private broker" in log
    assert not port_open("127.0.0.1", port)

    # created once, reused: the next run keeps every account's password
    before = {a.name: d.password(a.name) for a in d.accounts().all()}
    again = MtorProcess(["up"], env=env, cwd=tmp_path)
    processes.append(again)
    await wait_running(d, again)
    assert {a.name: d.password(a.name) for a in d.accounts().all()} == before
    rc, log = again.terminate(timeout=30)
    assert rc == 0, log
    assert status_ok, err


@pytest.mark.slow
async def test_mtor_up_uses_a_named_broker_and_warns_when_it_is_open(
    tmp_path: Path, processes: list[MtorProcess], own_broker: PrivateBroker
) -> None:
    env = mtor_env(HOME=str(tmp_path))
    up = MtorProcess(["up", "--broker", own_broker.url, "--realm", "open"], env=env, cwd=tmp_path)
    processes.append(up)
    async with running_bus(make_config(own_broker.url, "open")) as bus:
        seen = Collector()
        await bus.subscribe(topics.ORCH_STATE.build(realm="open"), seen)
        await seen.wait_for(lambda m: b"online" in m.payload, timeout=30)
    rc, log = up.terminate(timeout=30)
    assert rc == 0, log
    assert "lets anonymous clients in" in log
    assert not (tmp_path / "state" / "broker").exists()  # no private broker made
