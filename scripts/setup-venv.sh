#!/usr/bin/env bash
# Shared set-up for scripts/run.sh and scripts/test.sh: make .venv in the repository root
# and install wattprint into it in editable mode (with its [test] extra for the tests).
# The install runs again only when pyproject.toml has changed since the last one (a stamp
# in .venv).
#
# Run it directly, or source it to get the functions setup_venv and apt_install.
# Debian's python3 refuses pip installs into the system (PEP 668), so everything goes
# into .venv; Debian needs the python3-venv package for that, installed here if missing.
# PYTHON picks the interpreter that makes the venv (default: python3 on PATH).

set -euo pipefail

WATTPRINT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WATTPRINT_VENV="$WATTPRINT_ROOT/.venv"

# apt_install PACKAGE...: install Debian packages non-interactively, as root or via sudo.
apt_install() {
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            echo "wattprint: not root and no sudo: install these Debian packages yourself: $*" >&2
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "wattprint: no apt-get here: install the equivalents of these Debian packages: $*" >&2
        return 1
    fi
    echo "wattprint: installing Debian packages: $*" >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

_venv_usable() {
    [ -x "$WATTPRINT_VENV/bin/python" ] && "$WATTPRINT_VENV/bin/python" -m pip --version >/dev/null 2>&1
}

_make_venv() {
    local python="${PYTHON:-python3}"
    if ! command -v "$python" >/dev/null 2>&1; then
        echo "wattprint: $python not found; install Python 3.11 or newer (Debian: apt-get install python3 python3-venv)" >&2
        return 1
    fi
    # Without python3-venv, Debian's `python3 -m venv` fails but leaves a venv without pip.
    if "$python" -m venv "$WATTPRINT_VENV" && _venv_usable; then
        return 0
    fi
    rm -rf "$WATTPRINT_VENV"
    apt_install python3-venv
    "$python" -m venv "$WATTPRINT_VENV"
    _venv_usable
}

# setup_venv [EXTRAS]: make .venv if needed and (re)install wattprint when pyproject.toml
# changed. EXTRAS: "test" (the default: what scripts/test.sh needs) or "none" (just the
# daemon's own dependencies: scripts/run.sh). An install with the test extra also
# serves "none"; the stamp in .venv records which one was made.
setup_venv() {
    local extras="${1:-test}"
    if ! _venv_usable; then
        echo "wattprint: creating $WATTPRINT_VENV" >&2
        _make_venv
    fi
    local stamp="$WATTPRINT_VENV/.wattprint-install-stamp"
    local hash have_hash have_extras
    hash="$(sha256sum "$WATTPRINT_ROOT/pyproject.toml" | cut -d' ' -f1)"
    if [ -f "$stamp" ]; then
        read -r have_hash have_extras <"$stamp" || true
        if [ "$have_hash" = "$hash" ] && { [ "$extras" = none ] || [ "${have_extras:-test}" = "$extras" ]; }; then
            return 0
        fi
    fi
    local target="$WATTPRINT_ROOT" shown="wattprint"
    if [ "$extras" != none ]; then
        target="$WATTPRINT_ROOT[$extras]"
        shown="wattprint[$extras]"
    fi
    echo "wattprint: installing $shown into $WATTPRINT_VENV" >&2
    rm -f "$stamp"
    "$WATTPRINT_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$target"
    echo "$hash $extras" >"$stamp"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    setup_venv
fi
