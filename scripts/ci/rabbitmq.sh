#!/usr/bin/env bash
# RabbitMQ for the rabbitmq triggers' tests: 127.0.0.1:5672, guest/guest.
# Starts the installed broker if it is not running (once: starting a second node crashes it);
# fails loudly if it cannot.
set -euo pipefail
ready() { rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1; }
listening() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! command -v rabbitmq-server >/dev/null || ! command -v rabbitmqctl >/dev/null; then
    echo "rabbitmq: not installed (Debian package: rabbitmq-server)" >&2
    exit 1
fi
if ! rabbitmqctl -q status >/dev/null 2>&1; then
    echo "rabbitmq: not running; starting it"
    rabbitmq-server -detached
    # await_startup fails until the node has registered: retry it (about 5-7 s from cold).
    for _ in $(seq 1 60); do ready && break; sleep 1; done
elif ! listening; then
    # The node runs but its app is stopped (e.g. a test's `rabbitmqctl stop_app` that died).
    echo "rabbitmq: node up, app stopped; starting the app"
    rabbitmqctl -q start_app
fi
for _ in $(seq 1 30); do listening && break; sleep 1; done
listening || { echo "rabbitmq: not reachable on 127.0.0.1:5672" >&2; exit 1; }
echo "rabbitmq: ready ($(rabbitmqctl -q version 2>/dev/null || echo unknown version))"
