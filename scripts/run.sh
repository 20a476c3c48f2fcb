#!/usr/bin/env bash
# Set up .venv (see setup-venv.sh) and run the daemon in the foreground with its
# built-in defaults: `wattprint run` plus any arguments given here, e.g. --config PATH.
set -euo pipefail
# shellcheck source=scripts/setup-venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup-venv.sh"
setup_venv none   # the daemon's own dependencies only, not the test tools
# No cd: relative paths in the arguments mean what the caller meant.
exec "$WATTPRINT_VENV/bin/wattprint" run "$@"
