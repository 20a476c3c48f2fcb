#!/bin/sh
# wattprint TaskEpilog: writes the job's energy into its Slurm Comment.
#
# slurm.conf (every node):   TaskEpilog=/etc/slurm/wattprint-taskepilog.sh
# slurmstepd runs it as the job's user after each task, the job still running. It acts
# once per job, for the batch step (no SLURM_STEP_ID); other tasks return at once.
# It waits (WATTPRINT_SLURM_WAIT_S, default 30 s) for the wattprint daemon on this
# node to see the job end, then runs
#   scontrol update JobId=N Comment="wattprint: <kWh> kWh, <g> gCO2e (<status>), <h> GPU-h"
# The daemon is found as the wattprint CLI finds it: /etc/wattprint/wattprint.toml or
# WATTPRINT_CONFIG, WATTPRINT_<SECTION>_<KEY> overrides, WATTPRINT_URL (the daemon's
# base URL), from the task's environment or from wattprint-slurm.env next to this
# script (WATTPRINT_SLURM_ENV names another file). WATTPRINT_BIN: the wattprint
# executable (default: wattprint on PATH).
# Never fails the job: every error is reported on stderr (the slurmd log) and ignored.
# A Comment is writable by the job's user too: see docs/deploy.md for AdminComment.

# Slurm runs epilogs with a minimal environment (EpilogSlurmctld: SLURM_* only, no PATH).
PATH=${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}
export PATH
# Site settings (WATTPRINT_URL, WATTPRINT_CONFIG, WATTPRINT_BIN, WATTPRINT_SLURM_WAIT_S,
# SLURM_CONF, ...): wattprint-slurm.env next to this script, exported when it exists.
env_file=${WATTPRINT_SLURM_ENV:-$(dirname "$0")/wattprint-slurm.env}
if [ -r "$env_file" ]; then
    set -a
    # shellcheck disable=SC1090
    . "$env_file"
    set +a
fi
[ -n "${SLURM_JOB_ID:-}" ] || exit 0
[ -z "${SLURM_STEP_ID:-}" ] || exit 0
name=$SLURM_JOB_ID
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    name="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
fi
line=$("${WATTPRINT_BIN:-wattprint}" slurm-summary --job "$SLURM_JOB_ID" --name "$name" \
    ${SLURM_JOB_USER:+--user "$SLURM_JOB_USER"} --wait "${WATTPRINT_SLURM_WAIT_S:-30}") || exit 0
scontrol update JobId="$SLURM_JOB_ID" Comment="wattprint: $line" >/dev/null ||
    echo "wattprint-taskepilog: scontrol update JobId=$SLURM_JOB_ID failed" >&2
exit 0
