#!/usr/bin/env bash
# Remove the etl-service unit, virtualenv and user. Keeps settings and data unless asked:
#
#   sudo deploy/uninstall.sh [--prefix DIR] [--config-dir DIR] [--purge]
#
# --purge also deletes CONFIG_DIR (etl.env) and /var/lib/etl-service (e.g. a chDB folder).
# The PostgreSQL ledger (schema etl) and ClickHouse tables are never touched.
set -euo pipefail

prefix=/opt/etl-service
config_dir=/etc/etl-service
purge=no
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix=$2; shift 2 ;;
        --config-dir) config_dir=$2; shift 2 ;;
        --purge) purge=yes; shift ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "uninstall.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "uninstall.sh: run as root (sudo)" >&2; exit 1; }

if [ -e /etc/systemd/system/etl.service ]; then
    systemctl disable --now etl.service >/dev/null 2>&1 || true
    rm -f /etc/systemd/system/etl.service
    systemctl daemon-reload
    echo "uninstall.sh: stopped, disabled and removed etl.service"
fi
rm -rf "$prefix"
echo "uninstall.sh: removed $prefix"
if [ "$purge" = yes ]; then
    rm -rf "$config_dir" /var/lib/etl-service
    echo "uninstall.sh: purged $config_dir and /var/lib/etl-service"
else
    echo "uninstall.sh: kept $config_dir and /var/lib/etl-service (use --purge to delete them)"
fi
if id etl-service >/dev/null 2>&1; then
    userdel etl-service
    echo "uninstall.sh: removed user etl-service"
fi
