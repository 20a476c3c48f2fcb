#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine, then run it:
# Debian's influxdb and prometheus packages (the real servers the tests start), .venv
# with wattprint[test] (see setup-venv.sh), then `python -m pytest` with any arguments
# given here. Exits with pytest's status; "no tests collected" (5) counts as failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/setup-venv.sh
source scripts/setup-venv.sh

missing=()
command -v influxd >/dev/null 2>&1 || missing+=(influxdb)
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    missing+=(prometheus)
fi
# systemd-analyze (verify, security --offline) checks deploy/systemd/wattprint.service.
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
if [ "${#missing[@]}" -gt 0 ]; then
    if ! apt_install "${missing[@]}"; then
        echo "wattprint: could not install ${missing[*]}: tests that need them skip (and fail under CI=true)" >&2
    fi
fi

setup_venv

status=0
"$WATTPRINT_VENV/bin/python" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "wattprint: pytest collected no tests: that is a failure" >&2
fi
exit "$status"
