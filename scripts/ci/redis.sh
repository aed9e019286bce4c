#!/usr/bin/env bash
# Redis for the redis store's tests: 127.0.0.1:6379, no auth, keeps nothing on disk.
# Starts the installed server if it is not running; fails loudly if it cannot.
set -euo pipefail
ready() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]; }
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    echo "redis: not installed (Debian packages: redis-server, redis-tools)" >&2
    exit 1
fi
if ! ready; then
    echo "redis: not running; starting it"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    for _ in $(seq 1 60); do ready && break; sleep 0.2; done
fi
ready || { echo "redis: not reachable on 127.0.0.1:6379 (log: /var/log/redis/ci.log)" >&2; exit 1; }
echo "redis: ready ($(redis-cli -h 127.0.0.1 info server | tr -d '\r' | grep '^redis_version:'))"
