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
# Hermetic: the suite runs in a PID namespace of its own (with its own /proc), so the
# daemons it starts and the /proc scans it makes see only the processes the tests
# started, never other users' labelled jobs on a shared machine. Needs root (or
# unshare's privileges); without them the suite runs as it is, which CI=true refuses
# (tests/conftest.py checks WATTPRINT_TEST_PIDNS).
pytest_cmd=("$WATTPRINT_VENV/bin/python" -m pytest "$@")
if unshare --pid --fork --mount-proc true >/dev/null 2>&1; then
    WATTPRINT_TEST_PIDNS=1 unshare --pid --fork --kill-child --mount-proc "${pytest_cmd[@]}" || status=$?
else
    echo "wattprint: cannot create a PID namespace (not root?): tests see every process on this machine" >&2
    "${pytest_cmd[@]}" || status=$?
fi
if [ "$status" -eq 5 ]; then
    echo "wattprint: pytest collected no tests: that is a failure" >&2
fi
exit "$status"
