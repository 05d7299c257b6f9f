"""Configuration: ``config.yaml`` loaded once in ``main`` into typed models.

Unknown keys are rejected.  Precedence, lowest to highest: built-in
defaults, the YAML file, environment (``MTOR_BROKER``, ``MTOR_REALM``,
``MTOR_NODE_ID``, ``MTOR_BROKER_USERNAME``, ``MTOR_BROKER_PASSWORD``), then
command-line flags.  Nothing here reads the environment at import time: the
caller passes it in.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from daemon.errors import ConfigError
from daemon.gateway.config import GatewayConfig
from daemon.homeassistant.config import HomeAssistantConfig
from daemon.orchestrator.config import OrchestratorConfig
from daemon.plugins import NodeConfigBase, NodeEntry, node_type, node_types
from daemon.workflows.model import WorkflowConfig, check_name

SECRET_KEYS = frozenset({"password", "api_key", "token", "secret", "alarm_code"})
SEARCH_PATH = (Path("config.yaml"), Path("/etc/mtor/config.yaml"))
NAME_RE = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
Scheme = Literal["mqtt", "mqtts", "ws", "wss", "unix"]
DEFAULT_PORTS: dict[str, int] = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443, "unix": 0}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(_Strict):
    """TLS for ``mqtts://`` and ``wss://`` (system CAs when ``ca_file`` is unset)."""

    ca_file: Path | None = Field(default=None, description="CA bundle that signed the broker.")
    cert_file: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    key_file: Path | None = Field(default=None, description="Client private key.")
    insecure: bool = Field(default=False, description="Skip hostname verification (testing only).")


class ReconnectConfig(_Strict):
    """Capped exponential backoff with jitter between connection attempts."""

    initial_delay: float = Field(default=0.1, gt=0, description="First retry delay (s).")
    max_delay: float = Field(default=5.0, gt=0, description="Longest delay between tries (s).")
    jitter: float = Field(default=0.2, ge=0, le=1, description="Random +/- fraction of a delay.")


class BrokerConfig(_Strict):
    """How to reach the MQTT 5 broker."""

    url: str = Field(
        default="mqtt://localhost:1883",
        description="mqtt://, mqtts://, ws://, wss:// (host:port[/path]) or unix:///path.",
    )
    username: str | None = Field(default=None, description="MQTT username.")
    password: SecretStr | None = Field(
        default=None, description="MQTT password (prefer password_file or MTOR_BROKER_PASSWORD)."
    )
    password_file: Path | None = Field(default=None, description="File holding the password.")
    client_id: str | None = Field(
        default=None, description="MQTT client id (default: mtor-<role>-<node_id>)."
    )
    keepalive: int = Field(default=30, ge=5, le=65535, description="MQTT keepalive (s).")
    connect_timeout: float = Field(default=5.0, gt=0, description="Connect timeout (s).")
    tls: TLSConfig = Field(default_factory=TLSConfig)
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)
    max_inflight: int = Field(
        default=64, ge=1, description="Publishes awaiting the broker at once (flow control)."
    )
    outbox_size: int = Field(
        default=100_000,
        ge=0,
        description="QoS 1/2 publishes kept until the broker acknowledges them "
        "(queued or in flight, also across reconnects); 0 keeps none while disconnected.",
    )
    outbox_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Bytes (topic + payload + properties) those may hold; past either "
        "bound publishers wait, and post() drops (counted).",
    )
    session_expiry: int = Field(
        default=300,
        ge=0,
        le=0xFFFFFFFF,
        description="Daemons' MQTT session expiry (s): the broker keeps a node's or the "
        "orchestrator's subscriptions and queues its QoS 1/2 messages that long while it "
        "is away; 0: clean sessions.",
    )
    max_packet_size: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        le=268_435_460,
        description="Largest MQTT packet the broker may send us (bytes); it drops larger ones.",
    )

    @field_validator("url")
    @classmethod
    def _url_ok(cls, v: str) -> str:
        parse_broker_url(v)
        return v

    @property
    def endpoint(self) -> BrokerEndpoint:
        return parse_broker_url(self.url)


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    scheme: str
    host: str
    port: int
    path: str

    @property
    def transport(self) -> Literal["tcp", "websockets", "unix"]:
        if self.scheme in ("ws", "wss"):
            return "websockets"
        return "unix" if self.scheme == "unix" else "tcp"

    @property
    def tls(self) -> bool:
        return self.scheme in ("mqtts", "wss")


def parse_broker_url(url: str) -> BrokerEndpoint:
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in DEFAULT_PORTS:
        raise ValueError(
            f"unsupported broker URL scheme {scheme!r}: use mqtt, mqtts, ws, wss or unix"
        )
    if scheme == "unix":
        path = parts.path or parts.netloc
        if not path:
            raise ValueError("unix:// broker URL needs a socket path, e.g. unix:///run/mqtt.sock")
        return BrokerEndpoint(scheme, path, 0, path)
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r} has a bad port") from exc
    return BrokerEndpoint(scheme, parts.hostname, port, parts.path or "/mqtt")


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = Field(default="info")
    format: Literal["text", "json"] = Field(
        default="text", description="json: one object per line (journald / log shippers)."
    )


class DaemonConfig(_Strict):
    """The node daemon's own timing."""

    health_interval: float = Field(default=30.0, gt=0, description="Seconds between health.")
    shutdown_timeout: float = Field(
        default=5.0, gt=0, description="Graceful shutdown budget on SIGTERM (s)."
    )
    restart_initial_delay: float = Field(
        default=1.0, gt=0, description="First restart delay of a crashed node (s)."
    )
    restart_max_delay: float = Field(default=60.0, gt=0, description="Restart delay cap (s).")
    state_dir: Path = Field(
        default=Path("state"), description="Where nodes keep local state (buffers, snapshots)."
    )
    token_file: Path | None = Field(
        default=None,
        description="File holding the API token this daemon's own tasks are submitted with "
        "(camera detection, voice chat and remote stt); needed where orchestrator.require_token.",
    )


def _default_nodes() -> dict[str, NodeConfigBase]:
    # What `nodes` holds when the file has none; `mtor node` then runs every node
    # type that works here instead (nodes_named() is False, daemon.cli.nodes).
    return {"sensors": node_type("sensors").config.model_validate({"type": "sensors"})}


class Config(_Strict):
    """The whole configuration of one M-TOR process."""

    # Built on first use, not at import: `nodes` validates against the node types
    # registered then (daemon.plugins), and importing them must not be this module's.
    model_config = ConfigDict(extra="forbid", defer_build=True)

    realm: str = Field(default="home", pattern=NAME_RE, description="Realm name (topic root).")
    node_id: str | None = Field(
        default=None,
        pattern=NAME_RE,
        max_length=64,
        description="This daemon's id (default: the broker username, else the hostname).",
    )
    area: str | None = Field(
        default=None, max_length=256, description="Where it stands, e.g. kitchen."
    )
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    orchestrator: OrchestratorConfig = Field(default_factory=OrchestratorConfig)
    homeassistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    nodes: dict[str, NodeEntry] = Field(
        default_factory=_default_nodes,
        description="Nodes hosted by `mtor node`, by name.  Without this key `mtor node` "
        "hosts every node type that works on the machine (as `mtor up` does).",
    )
    workflows: dict[str, WorkflowConfig] = Field(
        default_factory=dict, description="Workflows by name (see docs/workflows.md)."
    )
    workflows_dir: Path | None = Field(
        default=None, description="Also load workflows from the *.yaml files in this directory."
    )

    @field_validator("workflows")
    @classmethod
    def _workflow_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            check_name(name)
        return v

    @field_validator("nodes")
    @classmethod
    def _node_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not re.match(NAME_RE, name):
                raise ValueError(f"node name {name!r} must match {NAME_RE}")
        return v

    @property
    def nodes_named(self) -> bool:
        """Did the config name its nodes (a ``nodes:`` key), or leave them to the machine?"""
        return "nodes" in self.model_fields_set

    @property
    def effective_node_id(self) -> str:
        """``node_id``, else the broker username (a node's account is its id), else the host."""
        return self.node_id or self.broker.username or default_node_id()

    def daemon_client_id(self, role: str) -> str:
        """The MQTT client id of a long-running daemon (``broker.client_id`` if set).

        With a password it carries a keyed hash of it: Mosquitto lets any account
        connect with another's client id and take its session over (kicking it off, or
        with clean start off, inheriting its subscriptions), so a daemon's id must be
        one nobody without its password can name.  Without one (a broker that takes
        anyone), the readable ``mtor-<role>-<node id>``."""
        if self.broker.client_id:
            return self.broker.client_id
        base = f"mtor-{role}-{self.effective_node_id}"
        password = self.broker_password()
        if not password:
            return base
        digest = hmac.new(password.encode(), f"mtor client id:{base}".encode(), hashlib.sha256)
        return f"{base[:64]}-{digest.hexdigest()[:20]}"

    def broker_password(self) -> str | None:
        """The MQTT password from config, or from ``password_file``."""
        if self.broker.password is not None:
            return self.broker.password.get_secret_value()
        if self.broker.password_file is not None:
            try:
                return self.broker.password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"broker.password_file: cannot read {self.broker.password_file}: {exc.strerror}"
                ) from exc
        return None

    def node_token(self) -> str | None:
        """The API token of this daemon's own tasks (``daemon.token_file``), if any."""
        path = self.daemon.token_file
        if path is None:
            return None
        try:
            return path.read_text().strip() or None
        except OSError as exc:
            raise ConfigError(f"daemon.token_file: cannot read {path}: {exc.strerror}") from exc


# Host names images ship with: every clone of one has the same, and two daemons with
# one node id knock each other off the broker (one client id), so the machine id is
# added to them.
DISTRIBUTION_HOSTNAMES: Final = frozenset(
    {"raspberrypi", "raspberry", "pi", "ubuntu", "debian", "localhost", "dietpi", "orangepi",
     "jetson", "nano", "tegra-ubuntu", "armbian", "rockpi", "odroid", "beaglebone", "node"}
)  # fmt: skip
MACHINE_ID: Final = Path("/etc/machine-id")


def default_node_id(hostname: str | None = None, machine_id: Path = MACHINE_ID) -> str:
    """The host name; for a distribution's default host name (a cloned image), the
    host name and the first 8 hex digits of the machine id (``raspberrypi-1f2e3d4c``)."""
    name = (hostname if hostname is not None else socket.gethostname()).split(".")[0].lower()
    name = re.sub(r"[^a-z0-9_-]", "-", name) or "node"
    if name in DISTRIBUTION_HOSTNAMES:
        try:
            ident = machine_id.read_text().strip().lower()
        except OSError:
            ident = ""
        if re.fullmatch(r"[0-9a-f]{8,}", ident):
            return f"{name}-{ident[:8]}"
    return name


@dataclass(frozen=True)
class Overrides:
    """Values from the command line (highest precedence)."""

    broker: str | None = None
    realm: str | None = None
    node_id: str | None = None


def find_config_file(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    """The file to load: ``--config``, ``MTOR_CONFIG``, ./config.yaml, /etc/mtor/config.yaml."""
    chosen = explicit or environ.get("MTOR_CONFIG")
    if chosen:
        path = Path(chosen)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    for candidate in SEARCH_PATH:
        if candidate.is_file():
            return candidate
    return None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def build_config(
    data: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    overrides: Overrides | None = None,
    source: str = "config",
) -> Config:
    """Validate ``data`` with environment and command-line overrides applied."""
    merged: dict[str, Any] = dict(data)
    broker = dict(merged.get("broker") or {})
    env = environ or {}
    ov = overrides or Overrides()
    for key, env_name, flag in (
        ("url", "MTOR_BROKER", ov.broker),
        ("username", "MTOR_BROKER_USERNAME", None),
        ("password", "MTOR_BROKER_PASSWORD", None),
    ):
        value = flag or env.get(env_name)
        if value:
            broker[key] = value
    if broker:
        merged["broker"] = broker
    for key, env_name, flag in (
        ("realm", "MTOR_REALM", ov.realm),
        ("node_id", "MTOR_NODE_ID", ov.node_id),
    ):
        value = flag or env.get(env_name)
        if value:
            merged[key] = value
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(explain_validation(exc, source)) from exc


def load_config(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Overrides | None = None,
) -> tuple[Config, Path | None]:
    """Find, read and validate the configuration; returns it and the file used."""
    env = os.environ if environ is None else environ
    file = find_config_file(path, env)
    data = read_yaml(file) if file else {}
    return build_config(data, env, overrides, str(file) if file else "defaults"), file


def explain_validation(exc: ValidationError, source: str) -> str:
    """One line per error: the dotted key path, what is wrong, and the bad value."""
    lines = [f"{source}: {exc.error_count()} error(s)"]
    for err in exc.errors():
        loc = _format_loc(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not allowed here; check its spelling and indentation)"
        value = err.get("input")
        secret = any(str(p) in SECRET_KEYS for p in err["loc"])
        hidden = secret or err["type"] in ("missing", "extra_forbidden")
        shown = "" if hidden else _short(value)
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def _format_loc(loc: tuple[int | str, ...]) -> str:
    # pydantic puts the discriminator tag after a node's name (nodes.<name>.<type>.key):
    # drop it so the path is the one written in the file.
    if len(loc) > 2 and loc[0] == "nodes" and loc[2] in node_types():
        loc = loc[:2] + loc[3:]
    # Workflow steps and conditions are tagged "~<key>" (daemon.workflows): not file keys.
    loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith("~")))
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _short(value: object) -> str:
    if isinstance(value, dict | list) or value is None:
        return ""
    if isinstance(value, SecretStr):
        return ""
    text = repr(value)
    return f" (got {text[:60]}{'...' if len(text) > 60 else ''})"


def config_for_show(config: Config) -> dict[str, Any]:
    """The effective config as plain data, secrets masked."""
    data = config.model_dump(mode="json")
    data["node_id"] = config.effective_node_id
    return data
