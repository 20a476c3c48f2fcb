#!/bin/sh
# wattprint EpilogSlurmctld: writes the job's energy into its AdminComment in Slurm's
# accounting database (shown by `sacct -o AdminComment`).
#
# slurm.conf (controller):   EpilogSlurmctld=/etc/slurm/wattprint-epilog-slurmctld.sh
# Needs accounting (slurmdbd). slurmctld runs it as SlurmUser after the job ended
# (`scontrol update` would answer "Job has already finished" there), so it uses
#   sacctmgr -i modify job where jobid=N set AdminComment="wattprint: ..."
# It waits (WATTPRINT_SLURM_WAIT_S, default 60 s) for the wattprint daemon to see the
# job end. The daemon is found as the wattprint CLI finds it: the config file or
# WATTPRINT_CONFIG, WATTPRINT_<SECTION>_<KEY> overrides, WATTPRINT_URL (set it in
# slurmctld's environment, e.g. a systemd drop-in, or in WATTPRINT_SLURM_ENV, default
# /etc/wattprint/slurm-epilog.env, sourced when it exists). One daemon answers for
# one node: for jobs on one node (see docs/deploy.md for multi-node jobs).
# Never fails: every error goes to stderr (the slurmctld log) and is ignored.

env_file=${WATTPRINT_SLURM_ENV:-/etc/wattprint/slurm-epilog.env}
# shellcheck disable=SC1090
[ -r "$env_file" ] && . "$env_file"
[ -n "${SLURM_JOB_ID:-}" ] || exit 0
name=$SLURM_JOB_ID
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    name="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
fi
line=$("${WATTPRINT_BIN:-wattprint}" slurm-summary --job "$SLURM_JOB_ID" --name "$name" \
    ${SLURM_JOB_USER:+--user "$SLURM_JOB_USER"} --wait "${WATTPRINT_SLURM_WAIT_S:-60}") || exit 0
# The job reaches slurmdbd shortly after it ends: retry while nothing was modified.
tries=0
while [ "$tries" -lt 20 ]; do
    out=$(sacctmgr -i modify job where jobid="$SLURM_JOB_ID" set AdminComment="wattprint: $line" 2>&1)
    case $out in
        *"Modified"*|*"modified job"*) exit 0 ;;
    esac
    tries=$((tries + 1))
    sleep 1
done
echo "wattprint-epilog-slurmctld: sacctmgr did not modify job $SLURM_JOB_ID: $out" >&2
exit 0
