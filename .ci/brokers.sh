#!/usr/bin/env bash
# .ci/brokers.sh — install the MQTT 5 brokers of the broker matrix (tests/test_broker_matrix.py)
# besides Mosquitto (install.sh installs that one):
#
#   rumqttd   PyPI iotcore==0.4.0, in a virtual environment of its own
#   aedes     npm aedes@2.0.0-beta.1 (the MQTT 5 beta; "aedes@2" matches no release)
#   ejabberd  Debian's ejabberd (mod_mqtt); tests/brokers.py runs it as the current user
#
# Everything but ejabberd goes under $MTOR_BROKERS_HOME (default ~/.cache/mtor-brokers):
# outside the repository and the project's .venv, so no broker can change the project's
# dependencies.  Idempotent: what is already installed at the pinned version is kept,
# so a second run takes about a second.  apt-get needs root (CI runs as root).
set -Eeuo pipefail

HOME_DIR="${MTOR_BROKERS_HOME:-$HOME/.cache/mtor-brokers}"
IOTCORE_VERSION=0.4.0
AEDES_VERSION=2.0.0-beta.1
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The project's interpreter (iotcore 0.4.0 ships a CPython 3.11 wheel), not its packages:
# `python -m venv` from inside a venv builds on the base interpreter.
PYTHON="${PYTHON:-$REPO_DIR/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3
started=$SECONDS

say() { printf 'brokers.sh: %s\n' "$*"; }

# --- rumqttd (iotcore) -------------------------------------------------------------
venv="$HOME_DIR/rumqttd/venv"
if [[ -x "$venv/bin/python" ]] &&
    [[ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("iotcore"))' 2>/dev/null)" == "$IOTCORE_VERSION" ]]; then
    say "iotcore $IOTCORE_VERSION (rumqttd) already in $venv"
else
    say "installing iotcore $IOTCORE_VERSION (rumqttd) into $venv"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "iotcore==$IOTCORE_VERSION"
fi

# --- aedes 2 (npm) -----------------------------------------------------------------
apt_updated=""
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    [[ -n "$apt_updated" ]] || apt-get update -qq
    apt_updated=1
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    say "installing node and npm (apt)"
    apt_install nodejs npm
fi
aedes="$HOME_DIR/aedes"
have_aedes=""
if [[ -f "$aedes/node_modules/aedes/package.json" ]]; then
    have_aedes="$(node -p "require('$aedes/node_modules/aedes/package.json').version" 2>/dev/null || true)"
fi
if [[ "$have_aedes" == "$AEDES_VERSION" ]]; then
    say "aedes $AEDES_VERSION already in $aedes"
else
    say "installing aedes $AEDES_VERSION into $aedes"
    mkdir -p "$aedes"
    [[ -f "$aedes/package.json" ]] || printf '{"name": "mtor-brokers-aedes", "private": true}\n' >"$aedes/package.json"
    npm install --prefix "$aedes" --no-audit --no-fund --loglevel=error "aedes@$AEDES_VERSION"
fi

# --- ejabberd (Debian) -------------------------------------------------------------
if compgen -G "/usr/lib/*/ejabberd-*/ebin/ejabberd.app" >/dev/null && command -v erl >/dev/null; then
    say "ejabberd already installed ($(dpkg-query -W -f='${Version}' ejabberd 2>/dev/null || echo '?'))"
else
    say "installing ejabberd (apt)"
    # --no-install-recommends: no erlang-dev and friends.  The package starts no
    # service here (no systemd); tests/brokers.py runs its own node.
    apt_install ejabberd
fi

say "done in $((SECONDS - started)) s"
