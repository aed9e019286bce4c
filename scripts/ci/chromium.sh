#!/usr/bin/env bash
# Chromium and its WebDriver for the dashboard's browser tests (Debian packages chromium and
# chromium-driver; never a downloaded browser). Installs them when missing; fails loudly if it
# cannot.
set -euo pipefail
have() { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }
if ! have; then
    echo "chromium: not installed; installing chromium chromium-driver"
    if [ "$(id -u)" -ne 0 ]; then
        echo "chromium: installing needs root (apt-get install chromium chromium-driver)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium chromium-driver >/tmp/overdue-ci-chromium.log 2>&1 || {
        apt-get update -q >>/tmp/overdue-ci-chromium.log 2>&1
        apt-get install -y -q chromium chromium-driver >>/tmp/overdue-ci-chromium.log 2>&1
    } || { echo "chromium: apt-get failed (log: /tmp/overdue-ci-chromium.log)" >&2; exit 1; }
fi
have || { echo "chromium: /usr/bin/chromium or /usr/bin/chromedriver missing after install" >&2; exit 1; }
echo "chromium: ready ($(/usr/bin/chromedriver --version | head -1))"
