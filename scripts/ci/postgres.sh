#!/usr/bin/env bash
# PostgreSQL for the postgres store's tests: 127.0.0.1:5432, trust auth, database `test`.
# Starts the installed cluster if it is not running; fails loudly if it cannot.
# The database-restart test also needs initdb/pg_ctl (package postgresql) and runuser (util-linux).
set -euo pipefail
ready() { pg_isready -q -h 127.0.0.1 -p 5432; }
if ! command -v pg_isready >/dev/null; then
    echo "postgres: not installed (Debian package: postgresql)" >&2
    exit 1
fi
if ! ready; then
    echo "postgres: not running; starting it"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort | tail -1)" main start
    for _ in $(seq 1 60); do ready && break; sleep 0.5; done
fi
ready || { echo "postgres: not reachable on 127.0.0.1:5432" >&2; exit 1; }
if ! psql -h 127.0.0.1 -U postgres -Atc "SELECT 1" test >/dev/null 2>&1; then
    psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test" postgres
fi
command -v runuser >/dev/null || { echo "postgres: runuser missing (util-linux)" >&2; exit 1; }
ls /usr/lib/postgresql/*/bin/initdb >/dev/null || { echo "postgres: initdb missing" >&2; exit 1; }
echo "postgres: ready ($(psql -h 127.0.0.1 -U postgres -Atc 'SHOW server_version' test))"
