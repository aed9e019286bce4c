#!/usr/bin/env bash
# MariaDB for the mysql store's tests: 127.0.0.1:3306, root with an empty password, database `test`.
# Starts the installed server if it is not running; fails loudly if it cannot.
set -euo pipefail
ready() { mysqladmin --protocol=tcp -h 127.0.0.1 -P 3306 -uroot ping >/dev/null 2>&1; }
if ! command -v mariadbd >/dev/null && [ ! -x /usr/sbin/mariadbd ]; then
    echo "mariadb: not installed (Debian package: mariadb-server)" >&2
    exit 1
fi
if ! ready; then
    echo "mariadb: not running; starting it"
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    for _ in $(seq 1 60); do ready && break; sleep 0.5; done
fi
ready || { echo "mariadb: not reachable on 127.0.0.1:3306" >&2; exit 1; }
mysql --protocol=tcp -h 127.0.0.1 -uroot -e "CREATE DATABASE IF NOT EXISTS test"
echo "mariadb: ready ($(mysql --protocol=tcp -h 127.0.0.1 -uroot -Nse 'SELECT VERSION()'))"
