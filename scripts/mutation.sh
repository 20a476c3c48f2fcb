#!/usr/bin/env bash
# Mutation testing of wattprint's core with mutmut 3 (PyPI). Not part of CI: too slow for
# 2 cores. See docs/testing.md for the scores and every surviving mutant.
#
#   scripts/mutation.sh [--jobs N] [--survivors] [--tests FILE]... [MODULE.py ...]
#
# MODULE.py: paths under daemon/ or exporters/ (default: the core modules below). Each
# is tested only with the fast unit tests listed for it in TESTS_FOR (or given with
# --tests, needed for a module not in that table), minus the tests in DESELECT.
# --survivors: keep the last run and re-test only the mutants it did not kill (after
# adding tests); without it every run starts afresh. --jobs: parallel mutants (2; 1 when
# a test in SERIAL_TESTS is used).
#
# Installs mutmut==$MUTMUT_VERSION into .venv when missing. Everything runs under
# nice -n 19. Works in .mutmut/ (git-ignored; see scripts/mutation_helper.py for why a
# staging directory): the repository is never modified. Prints the score per module
# (killed / (mutants - argued equivalent, listed in scripts/mutation_equivalent.tsv))
# and exits 1 when a module is below 90%. A module in ONLY_FOR is mutated only in the
# functions listed there (the job book's steps in engine/tick.py, the job book of ledger/writer.py and api_views.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"

MUTMUT_VERSION="3.8.1"  # verified here with Python 3.11 (mutmut 3.x: runs from mutants/)
venv="${WATTPRINT_VENV:-$root/.venv}"
stage="$root/.mutmut"
equivalents="$root/scripts/mutation_equivalent.tsv"

DEFAULT_MODULES=(exporters/lineprotocol.py exporters/spool.py daemon/sources/base.py daemon/sources/rapl.py
                 daemon/attribution.py daemon/carbon.py daemon/engine/book.py daemon/engine/tick.py
                 daemon/ledger/writer.py daemon/ledger/co2e_sql.py daemon/api_views.py)
declare -A TESTS_FOR=(
    [exporters/lineprotocol.py]="tests/test_lineprotocol.py"
    [exporters/spool.py]="tests/test_spool.py"
    [daemon/sources/base.py]="tests/test_counter_diff.py tests/test_rapl.py"
    [daemon/sources/rapl.py]="tests/test_rapl.py tests/test_counter_diff.py"
    [daemon/attribution.py]="tests/test_attribution.py tests/test_mutants_attribution.py tests/test_job_numbers.py tests/test_review_numbers.py tests/test_engine.py"
    [daemon/carbon.py]="tests/test_mutants_carbon.py tests/test_carbon_slots.py tests/test_job_numbers.py tests/test_grid_series.py tests/test_review_numbers.py tests/test_engine.py"
    [daemon/engine/book.py]="tests/test_mutants_engine.py tests/test_job_numbers.py tests/test_carbon_slots.py tests/test_engine.py tests/test_review_numbers.py tests/test_attribution.py"
    [daemon/engine/tick.py]="tests/test_mutants_engine.py tests/test_job_numbers.py tests/test_carbon_slots.py tests/test_engine.py tests/test_review_numbers.py tests/test_attribution.py"
    [daemon/ledger/writer.py]="tests/test_ledger.py tests/test_mutants_ledger.py tests/test_job_numbers.py tests/test_carbon_slots.py tests/test_review_numbers.py tests/test_invariants.py"
    [daemon/ledger/co2e_sql.py]="tests/test_ledger.py tests/test_mutants_ledger.py tests/test_job_numbers.py tests/test_carbon_slots.py tests/test_review_numbers.py tests/test_invariants.py"
    [daemon/api_views.py]="tests/test_ledger.py tests/test_mutants_ledger.py tests/test_job_numbers.py tests/test_carbon_slots.py tests/test_review_numbers.py tests/test_invariants.py tests/test_openapi.py"
)
# The job book: engine/book.py is the job book alone and is mutated whole; of engine/tick.py
# (the tick's steps), ledger/writer.py and api_views.py only these functions are mutated (mutmut's own
# mutant-name patterns, `mutmut run NAME-PATTERN...`; the rest of those files is I/O,
# scheduling and the HTTP reader, covered by slower tests). A module not listed here is
# mutated whole. Names: x_FUNC for a function, xǁCLASSǁMETHOD for a method.
declare -A ONLY_FOR=(
    [daemon/engine/tick.py]="xǁEngineǁrestore xǁEngineǁtick_blocking xǁEngineǁ_observe_processes xǁEngineǁ_attribute xǁEngineǁ_counters_now xǁEngineǁsettle_blocking"
    [daemon/ledger/writer.py]="xǁLedgerǁbucket_of xǁLedgerǁslot_of xǁLedgerǁ_book xǁLedgerǁbucket_job_energy xǁLedgerǁset_intensities xǁLedgerǁjob_slot_energy_j xǁLedgerǁjob_co2e_g"
    [daemon/api_views.py]="x_job_json x_bucket_values x_series_json x_host_json"
)
# Not fast unit tests: a subprocess writer (imports the package afresh, with a 20 s
# deadline), a timing assertion, a wall-clock feeder thread, a 3 s reader/writer race
# (host_totals' one read transaction) and a real process burning CPU for 2 s (the
# tracker's /proc figures; the job book's arithmetic is in the other tests).
DESELECT=(
    test_sigkilled_writer_loses_nothing_it_acknowledged
    test_append_is_cheap_enough_for_the_tick
    test_start_feeding_advances_at_the_given_rate
    test_host_totals_is_one_read_of_the_store
    test_tracker_books_the_cpu_time_and_rss_proc_shows
)

# Tests that start labelled processes and scan /proc for them (the process tracker): two
# mutmut workers share one PID namespace, so with --jobs 2 one worker's test sees the
# other's processes (same labels) and fails for reasons that are no kill. Any of these
# in the run makes the default one job.
SERIAL_TESTS=(tests/test_engine.py tests/test_carbon_slots.py tests/test_review_numbers.py tests/test_job_numbers.py)

jobs=""
survivors=0
extra_tests=()
modules=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --jobs) jobs="$2"; shift 2 ;;
        --survivors) survivors=1; shift ;;
        --tests) extra_tests+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        -*) echo "mutation: unknown option $1" >&2; exit 2 ;;
        *) modules+=("$1"); shift ;;
    esac
done
[ "${#modules[@]}" -gt 0 ] || modules=("${DEFAULT_MODULES[@]}")

tests=("${extra_tests[@]}")
for m in "${modules[@]}"; do
    if [ -z "${TESTS_FOR[$m]:-}" ] && [ "${#extra_tests[@]}" -eq 0 ]; then
        echo "mutation: no tests known for $m: add it to TESTS_FOR in $0 or pass --tests FILE" >&2
        exit 2
    fi
    for t in ${TESTS_FOR[$m]:-}; do
        [[ " ${tests[*]} " == *" $t "* ]] || tests+=("$t")
    done
done
for t in "${tests[@]}"; do
    [ -f "$t" ] || { echo "mutation: test file $t does not exist" >&2; exit 2; }
done
if [ -z "$jobs" ]; then
    jobs=2
    for t in "${SERIAL_TESTS[@]}"; do
        if [[ " ${tests[*]} " == *" $t "* ]]; then
            jobs=1
            echo "mutation: $t scans /proc for its own labelled processes: one mutant at a time (--jobs 1)" >&2
            break
        fi
    done
fi

if ! "$venv/bin/python" -c 'import sys, importlib.metadata as m; sys.exit(m.version("mutmut") != sys.argv[1])' \
        "$MUTMUT_VERSION" 2>/dev/null; then
    echo "mutation: installing mutmut==$MUTMUT_VERSION into $venv" >&2
    nice -n 19 "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "mutmut==$MUTMUT_VERSION"
fi

deselect=""
for t in "${DESELECT[@]}"; do deselect="${deselect:+$deselect and }not $t"; done

# The stage: wattprint/{daemon,exporters} (fresh copies), tests/ and pyproject.toml
# (pytest's settings) as links, and mutmut's settings in setup.cfg (read because the
# project's pyproject.toml has no [tool.mutmut]).
if [ "$survivors" -eq 0 ]; then
    rm -rf "$stage"
elif [ ! -d "$stage/mutants" ]; then
    echo "mutation: --survivors needs a previous run in $stage" >&2
    exit 2
fi
mkdir -p "$stage"
if grep -q '^\[tool\.mutmut\]' pyproject.toml; then
    echo "mutation: pyproject.toml has [tool.mutmut]; this script keeps mutmut's settings in $stage/setup.cfg" >&2
    exit 2
fi
ln -sfn "$root/tests" "$stage/tests"
ln -sfn "$root/pyproject.toml" "$stage/pyproject.toml"
if [ "$survivors" -eq 0 ]; then
    nice -n 19 "$venv/bin/python" scripts/mutation_helper.py stage "$stage" "${modules[@]}"
else  # keep the staged sources mutmut mutated; only the tests are copied again
    # Hypothesis keeps the failing examples it found for mutants; replayed against the
    # clean code they fail mutmut's clean-test run (seen with test_gpu_conservation_property).
    rm -rf "$stage/mutants/.hypothesis"
fi
{
    echo "[mutmut]"
    echo "source_paths="
    echo "    wattprint"
    echo "only_mutate="
    for m in "${modules[@]}"; do echo "    wattprint/${m}"; done
    echo "pytest_add_cli_args_test_selection="
    for t in "${tests[@]}"; do echo "    $t"; done
    echo "    -m"
    echo "    not slow"
    echo "    -k"
    echo "    $deselect"
    echo "pytest_add_cli_args="
    echo "    -p"
    echo "    no:cacheprovider"
    echo "use_git_change_detection=false"
} >"$stage/setup.cfg"

# The mutants to run: every mutant of a whole module, or ONLY_FOR's functions (patterns).
patterns=()
restricted=0
for m in "${modules[@]}"; do
    prefix="$(dirname "$m")/$(basename "$m" .py)"
    prefix="wattprint.${prefix//\//.}"
    if [ -n "${ONLY_FOR[$m]:-}" ]; then
        restricted=1
        for f in ${ONLY_FOR[$m]}; do patterns+=("$prefix.${f}__mutmut_*"); done
    else
        patterns+=("$prefix.*")
    fi
done
names=()
if [ "$survivors" -eq 1 ]; then
    mapfile -t names < <(cd "$stage" && "$venv/bin/mutmut" results | sed -n 's/^ *\([^ :]*\): .*/\1/p' |
        while read -r n; do for p in "${patterns[@]}"; do [[ "$n" == $p ]] && { echo "$n"; break; }; done; done)
    if [ "${#names[@]}" -eq 0 ]; then
        echo "mutation: no surviving mutants to re-test" >&2
    fi
elif [ "$restricted" -eq 1 ]; then
    names=("${patterns[@]}")
fi
# The tests scan /proc (the process tracker): run them in their own PID namespace, as
# scripts/test.sh does, so other users' labelled processes are not seen (needs root or
# user namespaces; without, the engine tests may see foreign jobs and fail).
pidns=()
if unshare --pid --fork --mount-proc true >/dev/null 2>&1; then
    pidns=(unshare --pid --fork --kill-child --mount-proc)
    export WATTPRINT_TEST_PIDNS=1
fi

status=0
if [ "$survivors" -eq 0 ] || [ "${#names[@]}" -gt 0 ]; then
    # CI=true would make tests/conftest.py demand a PID namespace: this is no CI run.
    (cd "$stage" && env -u CI nice -n 19 "${pidns[@]}" "$venv/bin/mutmut" run --max-children "$jobs" "${names[@]}") 2>&1 |
        sed -u "s/.*\r//" || status=$?  # keep the last state of each spinner line
    if [ "$status" -ne 0 ]; then
        echo "mutation: mutmut run failed ($status)" >&2
        exit "$status"
    fi
fi
nice -n 19 "$venv/bin/python" scripts/mutation_helper.py report "$stage" "$equivalents" "${modules[@]}" -- "${patterns[@]}"
