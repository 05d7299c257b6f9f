"""A private Mosquitto broker child process: ``mtor up``'s, and the tests'.

Two kinds: an anonymous one from a throw-away config (the tests ask for it:
loopback only, nothing on disk), and one run from a generated broker
directory's ``mosquitto.conf`` (:meth:`PrivateBroker.generated`,
:mod:`daemon.provision`): authenticated and ACL'd, what ``mtor up`` starts.
Either sets TCP_NODELAY and is ready once its log says `` running``.
``stop()`` and ``restart()`` keep the same port, so clients can reconnect.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Final

from daemon.errors import BrokerStartError

READY_TIMEOUT: Final = 10.0
# Host names of this machine's loopback in a broker URL.
LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Is something accepting TCP connections there?"""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None,
    )


class PrivateBroker:
    """A Mosquitto child process on ``127.0.0.1:<port>``."""

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        extra_config: str = "",
        websocket_port: int | None = None,
        config_file: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.websocket_port = websocket_port
        self.extra_config = extra_config
        # A given config is someone else's (a broker directory): never written or removed.
        self._given = config_file
        self._dir = (
            config_file.parent if config_file else Path(tempfile.mkdtemp(prefix="mtor-broker-"))
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: deque[str] = deque(maxlen=200)
        self._pump: threading.Thread | None = None

    @classmethod
    def generated(cls, config_file: Path, port: int, host: str = "127.0.0.1") -> PrivateBroker:
        """A broker run from a generated ``mosquitto.conf`` whose plain listener is
        ``host:port`` (daemon.provision writes it; this only starts and stops it)."""
        return cls(port, host=host, config_file=config_file)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs (tests freeze it with SIGSTOP)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def config_file(self) -> Path:
        return self._given or self._dir / "mosquitto.conf"

    def _write_config(self) -> None:
        if self._given is not None:
            return
        lines = [
            "persistence false",
            "log_dest stderr",  # stdout is block-buffered into a pipe; stderr is not
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "set_tcp_nodelay true",
            "per_listener_settings false",
            "allow_anonymous true",
            f"listener {self.port} {self.host}",
        ]
        if self.websocket_port:
            lines += [f"listener {self.websocket_port} {self.host}", "protocol websockets"]
        if os.geteuid() == 0:
            lines.insert(0, "user root")  # otherwise it drops to 'mosquitto' and cannot read here
        self.config_file.write_text("\n".join(lines) + "\n" + self.extra_config)

    def start(self) -> None:
        exe = mosquitto_path()
        if exe is None:
            raise BrokerStartError("mosquitto is not installed (apt-get install mosquitto)")
        self._write_config()
        ready = threading.Event()
        proc = subprocess.Popen(
            [exe, "-c", str(self.config_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._proc = proc

        def pump() -> None:
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                self._log.append(line)
                if " running" in line:
                    ready.set()

        self._pump = threading.Thread(target=pump, name="mosquitto-log", daemon=True)
        self._pump.start()
        if not ready.wait(READY_TIMEOUT) or proc.poll() is not None:
            tail = "\n".join(list(self._log)[-10:])
            self.stop()
            raise BrokerStartError(f"mosquitto did not start on port {self.port}:\n{tail}")

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
            proc.kill() if kill else proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if self._pump is not None:
            self._pump.join(2)
        if proc.stderr is not None:
            proc.stderr.close()

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
        if self._given is None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PrivateBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
