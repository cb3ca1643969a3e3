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
stamp="$venv/.etl-service-installed"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
    echo "run_etl.sh: installing etl-service into $venv (first run, or pyproject.toml changed)..." >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$here"
    touch "$stamp"
fi
# exec: the Python process replaces this shell, so SIGTERM from systemd or Ctrl-C reach it.
exec "$venv/bin/python" -m etl_service "$@"
