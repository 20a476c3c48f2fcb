#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine, then run it:
# Debian's influxdb, prometheus, slurm-wlm, munge, slurmdbd, mariadb-server, openipmi and ipmitool packages
# (the real servers the tests start), .venv
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
# A real systemd for the unit (tests/test_systemd_real.py): a Debian root made with
# debootstrap, booted with systemd-nspawn.
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
# A real one-node Slurm (tests/slurm.py): munge, slurmctld + slurmd + clients, and for
# accounting slurmdbd with MariaDB.
command -v munged >/dev/null 2>&1 || missing+=(munge)
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 || ! command -v sbatch >/dev/null 2>&1; then
    missing+=(slurm-wlm)
fi
command -v slurmdbd >/dev/null 2>&1 || missing+=(slurmdbd)
command -v mariadbd >/dev/null 2>&1 || missing+=(mariadb-server)
# A BMC on loopback for the node source (tests/bmc.py): OpenIPMI's simulator, read
# through Debian's ipmitool.
command -v ipmi_sim >/dev/null 2>&1 || missing+=(openipmi)
command -v ipmitool >/dev/null 2>&1 || missing+=(ipmitool)
# A private CA and a certificate for the HTTPS Redfish BMC (tests/redfish_server.py).
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
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
    # bash is the namespace's PID 1: it reaps orphans (pytest as PID 1 would not, and
    # every process that outlives its parent would stay a zombie).
    WATTPRINT_TEST_PIDNS=1 unshare --pid --fork --kill-child --mount-proc \
        bash -c '"$@"; exit $?' wattprint-test-init "${pytest_cmd[@]}" || status=$?
else
    echo "wattprint: cannot create a PID namespace (not root?): tests see every process on this machine" >&2
    "${pytest_cmd[@]}" || status=$?
fi
if [ "$status" -eq 5 ]; then
    echo "wattprint: pytest collected no tests: that is a failure" >&2
fi

# The GPU tests a second time, against the oldest nvidia-ml-py pyproject.toml allows (the
# run above used the newest): a second venv, .venv-nvml-floor, with that exact version.
# On a full run (no arguments), or when WATTPRINT_NVML_FLOOR=1.
if [ "$#" -eq 0 ] || [ "${WATTPRINT_NVML_FLOOR:-0}" = "1" ]; then
    floor="$(sed -n 's/.*"nvidia-ml-py>=\([0-9.]*\)".*/\1/p' pyproject.toml)"
    floor_venv="$WATTPRINT_ROOT/.venv-nvml-floor"
    floor_stamp="$floor_venv/.wattprint-install-stamp"
    floor_want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    floor_status=0
    if [ -z "$floor" ]; then
        echo "wattprint: no nvidia-ml-py floor found in pyproject.toml" >&2
        floor_status=1
    elif [ ! -f "$floor_stamp" ] || [ "$(cat "$floor_stamp")" != "$floor_want" ]; then
        echo "wattprint: installing wattprint[test] with nvidia-ml-py==$floor into $floor_venv" >&2
        rm -f "$floor_stamp"
        { [ -x "$floor_venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$floor_venv"; } &&
            "$floor_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
                -e "$WATTPRINT_ROOT[test]" "nvidia-ml-py==$floor" &&
            echo "$floor_want" >"$floor_stamp" || floor_status=$?
    fi
    if [ "$floor_status" -eq 0 ]; then
        floor_tests=(tests/test_gpu_source.py tests/test_e2e_gpu_real.py)
        [ -f tests/test_nvml_sim.py ] && floor_tests+=(tests/test_nvml_sim.py)
        echo "wattprint: GPU tests again against nvidia-ml-py $floor (the floor)" >&2
        floor_cmd=("$floor_venv/bin/python" -m pytest -p no:cacheprovider "${floor_tests[@]}")
        if unshare --pid --fork --mount-proc true >/dev/null 2>&1; then
            WATTPRINT_TEST_PIDNS=1 unshare --pid --fork --kill-child --mount-proc \
                bash -c '"$@"; exit $?' wattprint-test-init "${floor_cmd[@]}" || floor_status=$?
        else
            "${floor_cmd[@]}" || floor_status=$?
        fi
    fi
    if [ "$floor_status" -ne 0 ]; then
        echo "wattprint: GPU tests against nvidia-ml-py $floor failed ($floor_status)" >&2
        [ "$status" -eq 0 ] && status=$floor_status
    fi
fi
exit "$status"
