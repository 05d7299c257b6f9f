"""The broker's TLS material, made with the ``openssl`` command (no Python crypto
package is needed): a realm CA and a server certificate it signs.

Keys are EC P-256.  The server certificate names every host a client may dial
(``subjectAltName``: DNS names and IP addresses) and carries the extensions a
strict verifier wants (key identifiers, ``serverAuth``), so Python's
``ssl.create_default_context(cafile=ca.crt)`` accepts it, also with
``VERIFY_X509_STRICT`` (the default from Python 3.13).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Final

from daemon.errors import ConfigError

log = logging.getLogger(__name__)

CA_DAYS: Final = 3650
SERVER_DAYS: Final = 825  # what browsers and strict verifiers accept for a leaf
OPENSSL_TIMEOUT: Final = 30.0
# A host name a certificate may name (and a config file may hold safely).
_LABEL: Final = r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})"
HOST_RE: Final = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")


def check_host(host: str) -> str:
    """A DNS name or an IP address, else :class:`ConfigError`."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not HOST_RE.match(host):
        raise ConfigError(f"{host!r} is not a host name or IP address")
    return host.lower()


def san(hosts: list[str]) -> str:
    """``subjectAltName`` value: ``DNS:a,IP:127.0.0.1,...`` (hosts already checked)."""
    parts: list[str] = []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
            entry = f"IP:{host}"
        except ValueError:
            entry = f"DNS:{host}"
        if entry not in parts:
            parts.append(entry)
    return ",".join(parts)


def openssl_path() -> str:
    exe = shutil.which("openssl")
    if exe is None:
        raise ConfigError("the openssl command is not installed (apt-get install openssl)")
    return exe


def _run(*args: str) -> None:
    try:
        subprocess.run(
            [openssl_path(), *args],
            check=True,
            capture_output=True,
            timeout=OPENSSL_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.decode(errors="replace").strip()
        raise ConfigError(f"openssl {args[0]} failed: {detail}") from exc
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(f"openssl {args[0]} did not finish in {OPENSSL_TIMEOUT:.0f}s") from exc


def _new_key(path: Path) -> None:
    # genpkey writes the key with the process umask: make it private first.
    path.touch(mode=0o600)
    os.chmod(path, 0o600)
    _run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))


def make_ca(cert: Path, key: Path, realm: str) -> None:
    """A self-signed CA for the realm's broker."""
    _new_key(key)
    _run(
        "req", "-x509", "-new", "-key", str(key), "-out", str(cert),
        "-days", str(CA_DAYS), "-sha256",
        "-subj", f"/O=M-TOR/CN=M-TOR realm {realm} broker CA",
        "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip
    os.chmod(cert, 0o644)
    log.info("made a CA certificate %s", cert)


def make_server_cert(cert: Path, key: Path, ca_cert: Path, ca_key: Path, hosts: list[str]) -> None:
    """A server certificate for ``hosts`` (the first is its common name), signed by the CA."""
    _new_key(key)
    with tempfile.TemporaryDirectory(prefix="mtor-tls-") as tmp:
        csr = Path(tmp) / "server.csr"
        ext = Path(tmp) / "server.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n"
            f"subjectAltName={san(hosts)}\n"
        )
        _run("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/O=M-TOR/CN={hosts[0]}")
        _run(
            "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-set_serial", _serial(),
            "-out", str(cert), "-days", str(SERVER_DAYS), "-sha256", "-extfile", str(ext),
        )  # fmt: skip
    os.chmod(cert, 0o644)
    log.info("made a server certificate %s for %s", cert, ", ".join(hosts))


def _serial() -> str:
    # A random 63-bit serial: no serial file to keep next to the CA.
    return str(int.from_bytes(os.urandom(8), "big") >> 1)
