"""MQTT 5 brokers other than the tests' Mosquitto, for the broker matrix.

Each :class:`MatrixBroker` is a child process on ``127.0.0.1:<free port>`` with a
config of its own in a temporary directory, one account (``USERNAME`` /
``PASSWORD``) where the broker authenticates, and the same ``url`` / ``stop`` /
``restart`` / ``kill`` / ``log_tail`` as :class:`daemon.broker.PrivateBroker`:

* ``mosquitto`` — the reference: the Debian package the realm uses, with a password file;
* ``rumqttd`` — rumqttd 0.20 inside PyPI's ``iotcore`` 0.4.0, run as
  ``python -m iotcore --config <toml>`` from its own virtual environment;
* ``aedes`` — aedes 2.0.0-beta.1 from npm, under node with ``tests/brokers/aedes_server.mjs``;
* ``ejabberd`` — Debian's ejabberd (mod_mqtt), a node of its own run straight by
  ``erl`` as the current user (not the system service, not ``ejabberdctl``, which
  insists on the ``ejabberd`` user), no Erlang distribution, its mnesia in the
  temporary directory; the account is registered by an ``-eval`` once it has started.

The extra ones are installed by ``.ci/brokers.sh`` under ``$MTOR_BROKERS_HOME``
(default ``~/.cache/mtor-brokers``), outside the repository and the project's
virtual environment.  :meth:`MatrixBroker.missing` says what is not installed.

:func:`probe_connack` reads what a broker announces in its CONNACK over a raw
socket, independent of the client under test.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import ClassVar, Final

from daemon.broker import free_port, port_open
from daemon.mqtt import codec

HERE: Final = Path(__file__).resolve().parent
# How long a broker may take to accept connections (ejabberd: ~1 s, the rest: less).
READY_TIMEOUT: Final = 20.0
USERNAME: Final = "matrix"
PASSWORD: Final = "matrix-secret"


def brokers_home() -> Path:
    """Where .ci/brokers.sh installs the extra brokers."""
    return Path(os.environ.get("MTOR_BROKERS_HOME", "~/.cache/mtor-brokers")).expanduser()


class BrokerMissing(RuntimeError):
    pass


class MatrixBroker:
    """A broker child process; subclasses say how to configure and start it."""

    name: ClassVar[str]
    # Does it check user names and passwords (so a wrong password is refused)?
    authenticates: ClassVar[bool] = True
    # A line of its output that says it is ready (besides its port being open).
    ready_marker: ClassVar[str | None] = None

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.username: str | None = USERNAME if self.authenticates else None
        self.password: str | None = PASSWORD if self.authenticates else None
        self.dir = Path(tempfile.mkdtemp(prefix=f"mtor-{self.name}-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: deque[str] = deque(maxlen=300)
        self._pump: threading.Thread | None = None
        self.start_seconds = 0.0  # how long the last start took

    # ------------------------------------------------------------ per broker

    @classmethod
    def missing(cls) -> str | None:
        """What is not installed (None: it can run)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Write the config files into ``self.dir`` (called before every start)."""

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    # ------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        why = self.missing()
        if why is not None:
            raise BrokerMissing(f"{self.name}: {why}")
        self.prepare()
        began = time.monotonic()
        ready = threading.Event()
        if self.ready_marker is None:
            ready.set()
        proc = subprocess.Popen(
            self.command(),
            cwd=self.dir,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._proc = proc
        marker = self.ready_marker

        def pump() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                self._log.append(line)
                if marker is not None and marker in line:
                    ready.set()

        self._pump = threading.Thread(target=pump, name=f"{self.name}-log", daemon=True)
        self._pump.start()
        deadline = began + READY_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if ready.is_set() and port_open(self.host, self.port):
                self.start_seconds = time.monotonic() - began
                return
            time.sleep(0.05)
        tail = "\n".join(self.log_tail(15))
        self.stop()
        raise RuntimeError(f"{self.name} did not start on port {self.port}:\n{tail}")

    def stop(self) -> None:
        self._end(kill=False)

    def kill(self) -> None:
        """Die abruptly (SIGKILL), as a crashed broker would."""
        self._end(kill=True)

    def _end(self, *, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            # The whole session: erl runs helpers (epmd is not started: no distribution).
            os.killpg(proc.pid, 9 if kill else 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait(5)
        if self._pump is not None:
            self._pump.join(2)
        if proc.stdout is not None:
            proc.stdout.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, n: int = 20) -> list[str]:
        return list(self._log)[-n:]

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> MatrixBroker:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<{self.name} on {self.url}>"


class Mosquitto(MatrixBroker):
    """The reference broker (Debian's mosquitto), with a password file."""

    name = "mosquitto"
    ready_marker = " running"

    @classmethod
    def missing(cls) -> str | None:
        for exe in ("mosquitto", "mosquitto_passwd"):
            if _which(exe) is None:
                return f"{exe} is not installed (apt-get install mosquitto)"
        return None

    def prepare(self) -> None:
        passwd = self.dir / "passwd"
        if not passwd.exists():
            exe = _which("mosquitto_passwd")
            assert exe is not None and self.username is not None and self.password is not None
            subprocess.run(
                [exe, "-c", "-b", str(passwd), self.username, self.password],
                check=True,
                capture_output=True,
            )
        lines = [
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {passwd}",
            f"listener {self.port} {self.host}",
        ]
        if os.geteuid() == 0:
            lines.insert(0, "user root")  # else it drops to 'mosquitto' and cannot read here
        (self.dir / "mosquitto.conf").write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        exe = _which("mosquitto")
        assert exe is not None
        return [exe, "-c", str(self.dir / "mosquitto.conf")]


class Rumqttd(MatrixBroker):
    """rumqttd 0.20 (inside iotcore 0.4.0): a v5 listener with static credentials."""

    name = "rumqttd"
    ready_marker = "Listening for remote connections"
    # Its largest accepted payload; the default (20 KiB) is below the matrix's 1 MB message.
    MAX_PAYLOAD: Final = 2 * 1024 * 1024

    @staticmethod
    def python() -> Path:
        return brokers_home() / "rumqttd" / "venv" / "bin" / "python"

    @classmethod
    def missing(cls) -> str | None:
        if not cls.python().exists():
            return f"no iotcore venv at {cls.python().parent.parent} (run .ci/brokers.sh)"
        return None

    def prepare(self) -> None:
        # rumqttd's own TOML (its rumqttd.toml layout); iotcore reads it with --config.
        auth = f'auth = {{ {self.username} = "{self.password}" }}'
        (self.dir / "rumqttd.toml").write_text(
            f"""\
id = 0

[router]
id = 0
max_connections = 1000
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v5.1]
name = "v5-1"
listen = "{self.host}:{self.port}"
next_connection_delay_ms = 1
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = {self.MAX_PAYLOAD}
    max_inflight_count = 100
    {auth}
"""
        )

    def command(self) -> list[str]:
        config = str(self.dir / "rumqttd.toml")
        return [str(self.python()), "-m", "iotcore", "--config", config, "--log-level", "INFO"]

    def env(self) -> dict[str, str]:
        # Its own venv only: never the project's (nor its PYTHONPATH).
        return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}


class Aedes(MatrixBroker):
    """aedes 2.0.0-beta.1 under node, with a user/password check of its own."""

    name = "aedes"
    ready_marker = "ready "

    @staticmethod
    def module() -> Path:
        return brokers_home() / "aedes" / "node_modules" / "aedes" / "aedes.js"

    @classmethod
    def missing(cls) -> str | None:
        if _which("node") is None:
            return "node is not installed"
        if not cls.module().exists():
            return f"aedes is not installed at {cls.module().parent} (run .ci/brokers.sh)"
        return None

    def command(self) -> list[str]:
        node = _which("node")
        assert node is not None
        return [node, str(HERE / "brokers" / "aedes_server.mjs")]

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "AEDES_MODULE": str(self.module()),
            "MTOR_PORT": str(self.port),
            "MTOR_USERS": json.dumps({self.username: self.password}),
        }


class Ejabberd(MatrixBroker):
    """ejabberd's mod_mqtt: one virtual host, internal (mnesia) accounts."""

    name = "ejabberd"
    ready_marker = "mtor: account"
    XMPP_HOST: Final = "localhost"

    @staticmethod
    def erl_libs() -> Path | None:
        """The directory holding ``ejabberd-<version>/`` (Debian: /usr/lib/<arch>)."""
        for ebin in sorted(glob.glob("/usr/lib/*/ejabberd-*/ebin/ejabberd.app")):
            return Path(ebin).parent.parent.parent
        return None

    @classmethod
    def missing(cls) -> str | None:
        if _which("erl") is None or cls.erl_libs() is None:
            return "ejabberd is not installed (apt-get install ejabberd; run .ci/brokers.sh)"
        return None

    def prepare(self) -> None:
        for sub in ("spool", "logs"):
            (self.dir / sub).mkdir(exist_ok=True)
        (self.dir / "ejabberd.yml").write_text(
            f"""\
hosts:
  - {self.XMPP_HOST}
loglevel: info
auth_method: internal
default_db: mnesia
listen:
  -
    port: {self.port}
    ip: "{self.host}"
    module: mod_mqtt
    backlog: 1000
modules:
  mod_mqtt: {{}}
"""
        )
        (self.dir / "inetrc").write_text(
            '{lookup,["file","native"]}.\n{host,{127,0,0,1}, ["localhost"]}.\n'
        )

    def command(self) -> list[str]:
        erl = _which("erl")
        assert erl is not None
        register = (
            f'io:format("mtor: account ~p~n", [ejabberd_auth:try_register('
            f'<<"{self.username}">>, <<"{self.XMPP_HOST}">>, <<"{self.password}">>)])'
        )
        # What ejabberdctl's `foreground` runs, minus the su to the ejabberd user and
        # the Erlang distribution (nothing talks to this node but MQTT clients).
        return [
            erl,
            "-noinput",
            "+K",
            "true",
            "-mnesia",
            "dir",
            f'"{self.dir / "spool"}"',
            "-s",
            "ejabberd",
            "-eval",
            register,
        ]

    def env(self) -> dict[str, str]:
        libs = self.erl_libs()
        assert libs is not None
        return {
            **os.environ,
            "EJABBERD_CONFIG_PATH": str(self.dir / "ejabberd.yml"),
            "EJABBERD_LOG_PATH": str(self.dir / "logs" / "ejabberd.log"),
            "ERL_CRASH_DUMP": str(self.dir / "logs" / "erl_crash.dump"),
            "ERL_INETRC": str(self.dir / "inetrc"),
            "ERL_LIBS": str(libs),
        }


def _which(exe: str) -> str | None:
    return shutil.which(exe) or next(
        (p for d in ("/usr/sbin", "/usr/local/sbin") if os.path.exists(p := f"{d}/{exe}")), None
    )


BROKERS: Final[dict[str, type[MatrixBroker]]] = {
    b.name: b for b in (Mosquitto, Rumqttd, Aedes, Ejabberd)
}


# ------------------------------------------------------------------ CONNACK


# The CONNACK properties (3.2.2.3) the matrix records, by name.
CONNACK_PROPERTIES: Final[dict[int, str]] = {
    0x11: "Session Expiry Interval",
    0x12: "Assigned Client Identifier",
    0x13: "Server Keep Alive",
    0x1A: "Response Information",
    0x1C: "Server Reference",
    0x1F: "Reason String",
    0x21: "Receive Maximum",
    0x22: "Topic Alias Maximum",
    0x24: "Maximum QoS",
    0x25: "Retain Available",
    0x27: "Maximum Packet Size",
    0x28: "Wildcard Subscription Available",
    0x29: "Subscription Identifier Available",
    0x2A: "Shared Subscription Available",
}


def probe_connack(
    host: str,
    port: int,
    *,
    username: str | None,
    password: str | None,
    client_id: str = "matrix-probe",
    timeout: float = 5.0,
) -> tuple[int, dict[str, object]]:
    """(reason code, {property name: value}) of the broker's CONNACK to an MQTT 5
    CONNECT, read over a raw socket; the connection is then closed with DISCONNECT."""
    connect = codec.encode_connect(client_id, keepalive=30, username=username, password=password)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(connect)
        data = b""
        while True:
            packets, _ = codec.split_packets(data)
            if packets:
                break
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"the broker closed the connection; read {data.hex()}")
            data += chunk
        first, body = packets[0]
        if first >> 4 != codec.CONNACK:
            raise ConnectionError(f"not a CONNACK: {data.hex()}")
        _, reason, props = codec.decode_connack(body)
        with contextlib.suppress(OSError):
            sock.sendall(codec.DISCONNECT_PACKET)
    named = {CONNACK_PROPERTIES.get(k, f"0x{k:02x}"): v for k, v in props.items()}
    return reason, named


class RawSession:
    """A bare MQTT 5 connection over a blocking socket, to see what a broker itself
    sends (copies, subscription identifiers), apart from the client under test."""

    def __init__(self, broker: MatrixBroker, client_id: str, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((broker.host, broker.port), timeout=timeout)
        self._data = b""
        self._next_id = 0
        self.sock.sendall(
            codec.encode_connect(
                client_id, keepalive=30, username=broker.username, password=broker.password
            )
        )
        first, body = self.read()
        if first >> 4 != codec.CONNACK or codec.decode_connack(body)[1] != 0:
            raise ConnectionError(f"refused: {first:02x} {body.hex()}")

    def read(self) -> tuple[int, bytes]:
        """The next packet: (first byte, body)."""
        while True:
            packets, _ = codec.split_packets(self._data)
            if packets:
                first, body = packets[0]
                size = codec.packet_size(self._data)
                self._data = self._data[size:]
                return first, body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            self._data += chunk

    def subscribe(self, topic_filter: str, sub_id: int) -> list[int]:
        """SUBSCRIBE at QoS 0 with a subscription identifier: the SUBACK's reason codes."""
        self._next_id += 1
        self.sock.sendall(
            codec.encode_subscribe(self._next_id, topic_filter, codec.subscribe_options(0), sub_id)
        )
        while True:
            first, body = self.read()
            if first >> 4 == codec.SUBACK:
                return codec.decode_suback(body)[1]

    def publish(self, topic: str, payload: bytes) -> None:
        """PUBLISH at QoS 0."""
        self.sock.sendall(
            codec.encode_publish(
                topic.encode(), payload, qos=0, retain=False, packet_id=0, props=b"\x00"
            )
        )

    def publishes_until(self, last: bytes) -> list[tuple[bytes, list[int]]]:
        """(payload, subscription identifiers) of each PUBLISH received, up to and
        including the one whose payload is ``last``."""
        out: list[tuple[bytes, list[int]]] = []
        while not out or out[-1][0] != last:
            first, body = self.read()
            if first >> 4 == codec.PUBLISH:
                msg = codec.decode_publish(first, body)
                out.append((msg.payload, list(msg.properties.get(codec.SUBSCRIPTION_ID, []))))
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(codec.DISCONNECT_PACKET)
        self.sock.close()
