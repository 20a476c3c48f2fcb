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
# WATTPRINT_CONFIG, WATTPRINT_<SECTION>_<KEY> overrides, WATTPRINT_URL. slurmctld
# passes none of its own environment to the script (only SLURM_* variables), so set
# them in wattprint-slurm.env next to this script. One daemon answers for one node:
# for jobs on one node. WATTPRINT_SLURM_FLEET=1: the whole job on all its nodes from
# InfluxDB instead (`wattprint slurm-summary --fleet`, every node's daemon writing to
# it under its Slurm node name; see docs/deploy.md).
# A heterogeneous job is one wattprint job (its HetJobId N): the epilog of its first
# component (SLURM_HET_JOB_OFFSET=0) reports it (`modify job where jobid=N` sets every
# component's record: sacct shows it on N+0 and N+1); the others return at once.
# Never fails: every error goes to stderr (the slurmctld log) and is ignored.

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
job=$SLURM_JOB_ID
if [ -n "${SLURM_HET_JOB_ID:-}" ]; then
    [ "${SLURM_HET_JOB_OFFSET:-0}" = 0 ] || exit 0
    job=$SLURM_HET_JOB_ID
fi
name=$job
fleet=
case ${WATTPRINT_SLURM_FLEET:-0} in
    1|yes|true) fleet=--fleet ;;
esac
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    name="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
fi
line=$("${WATTPRINT_BIN:-wattprint}" slurm-summary --job "$job" --name "$name" $fleet \
    ${SLURM_JOB_USER:+--user "$SLURM_JOB_USER"} --wait "${WATTPRINT_SLURM_WAIT_S:-60}") || exit 0
# The job reaches slurmdbd shortly after it ends: retry while nothing was modified.
tries=0
while [ "$tries" -lt 20 ]; do
    out=$(sacctmgr -i modify job where jobid="$job" set AdminComment="wattprint: $line" 2>&1)
    case $out in
        *"Modified"*|*"modified job"*) exit 0 ;;
    esac
    tries=$((tries + 1))
    sleep 1
done
echo "wattprint-epilog-slurmctld: sacctmgr did not modify job $job: $out" >&2
exit 0
