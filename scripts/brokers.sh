#!/usr/bin/env bash
# Real Kafka-protocol and RocketMQ brokers for the kafka:// and rocketmq:// backends' tests, from
# crates.io (no Java broker is reachable from this machine's registries):
#   - Kafka protocol: tansu (sqlite storage engine), 127.0.0.1:9092
#   - RocketMQ: rocketmq-rust name server 127.0.0.1:9876 and broker 127.0.0.1:10911
#
#   scripts/brokers.sh install [kafka|rocketmq]   build the pinned binaries into ~/.cargo/bin
#                                                 when missing (about 20-25 and 15 min cold)
#   scripts/brokers.sh start   [kafka|rocketmq]   start each from a fresh temp dir; wait for ports
#   scripts/brokers.sh stop    [kafka|rocketmq]   stop by PID
#   scripts/brokers.sh restart [kafka|rocketmq]   stop, then start on a fresh store
#   scripts/brokers.sh bounce  [kafka|rocketmq]   stop, then start again on the SAME store (what a
#                                                 broker crash and restart looks like; tests use it)
#   scripts/brokers.sh status
#
# (tansu reads sqlite://PATH relative to its working directory, the store directory.)
# State (PID files, logs, stores) lives under $OVERDUE_BROKERS_DIR (default /tmp/overdue-brokers).
set -euo pipefail

TANSU_VERSION=0.6.0
ROCKETMQ_VERSION=1.0.0
BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
STATE="${OVERDUE_BROKERS_DIR:-/tmp/overdue-brokers}"
mkdir -p "$STATE"

log() { echo "brokers: $*"; }
die() { echo "brokers: $*" >&2; exit 1; }

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # name port pidfile log
    local name=$1 port=$2 pidfile=$3 logfile=$4
    for _ in $(seq 1 120); do
        listening "$port" && return 0
        if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            tail -20 "$logfile" >&2 || true
            die "$name exited before listening on 127.0.0.1:$port (log: $logfile)"
        fi
        sleep 0.5
    done
    tail -20 "$logfile" >&2 || true
    die "$name is not listening on 127.0.0.1:$port after 60 s (log: $logfile)"
}

# install_crate <binary-to-check> <version-string> <cargo install args...>
install_crate() {
    local check=$1 want=$2
    shift 2
    # Installed at the pinned version already: nothing to do (`cargo install --list` prints
    # "tansu v0.6.0:" and the binaries under it).
    if [ -x "$BIN/$check" ] && cargo install --list 2>/dev/null | grep -qx "$want:"; then
        return 0
    fi
    # One build directory for every broker this run installs: the RocketMQ name server and broker
    # share most of their dependency tree, so the second build reuses the first one's artifacts.
    # Removed when the script exits.
    if [ -z "${BUILD_DIR:-}" ]; then
        BUILD_DIR=$(mktemp -d /tmp/overdue-broker-build.XXXXXX)
        trap 'rm -rf "$BUILD_DIR"' EXIT
    fi
    log "building $want into $BIN (cargo install $*; this takes a while on a cold machine)"
    local start=$SECONDS
    if ! CARGO_TARGET_DIR="$BUILD_DIR" cargo install "$@" >"$STATE/install-$check.log" 2>&1; then
        tail -30 "$STATE/install-$check.log" >&2
        die "cargo install $* failed (log: $STATE/install-$check.log)"
    fi
    log "built $want in $((SECONDS - start)) s"
}

install_kafka() {
    install_crate tansu "tansu v$TANSU_VERSION" \
        tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql
}

install_rocketmq() {
    install_crate rocketmq-namesrv-rust "rocketmq-namesrv v$ROCKETMQ_VERSION" \
        rocketmq-namesrv --version "$ROCKETMQ_VERSION" --locked
    install_crate rocketmq-broker-rust "rocketmq-broker v$ROCKETMQ_VERSION" \
        rocketmq-broker --version "$ROCKETMQ_VERSION" --locked
}

stop_pid() { # name pidfile
    local name=$1 pidfile=$2
    [ -f "$pidfile" ] || return 0
    local pid
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null || true
        log "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
}

start_kafka() {
    [ -x "$BIN/tansu" ] || die "tansu is not installed: run scripts/brokers.sh install kafka"
    if [ -f "$STATE/tansu.pid" ] && kill -0 "$(cat "$STATE/tansu.pid")" 2>/dev/null && listening 9092; then
        log "kafka (tansu) already running on 127.0.0.1:9092"
        return 0
    fi
    listening 9092 && die "127.0.0.1:9092 is taken by a process this script did not start"
    [ "${KEEP_STORE:-0}" = 1 ] || rm -rf "$STATE/kafka"
    mkdir -p "$STATE/kafka"
    (
        cd "$STATE/kafka"
        exec "$BIN/tansu" broker \
            --listener-url tcp://127.0.0.1:9092 \
            --advertised-listener-url tcp://127.0.0.1:9092 \
            --storage-engine "sqlite://tansu.db" \
            >>"$STATE/kafka/tansu.log" 2>&1
    ) &
    echo $! >"$STATE/tansu.pid"
    wait_port "tansu" 9092 "$STATE/tansu.pid" "$STATE/kafka/tansu.log"
    log "kafka (tansu $TANSU_VERSION) on 127.0.0.1:9092, store $STATE/kafka"
}

start_rocketmq() {
    [ -x "$BIN/rocketmq-namesrv-rust" ] && [ -x "$BIN/rocketmq-broker-rust" ] \
        || die "rocketmq-rust is not installed: run scripts/brokers.sh install rocketmq"
    if [ -f "$STATE/rocketmq-broker.pid" ] && kill -0 "$(cat "$STATE/rocketmq-broker.pid")" 2>/dev/null \
        && listening 10911 && listening 9876; then
        log "rocketmq already running (name server 127.0.0.1:9876, broker 127.0.0.1:10911)"
        return 0
    fi
    stop_pid rocketmq-broker "$STATE/rocketmq-broker.pid"
    stop_pid rocketmq-namesrv "$STATE/rocketmq-namesrv.pid"
    listening 9876 && die "127.0.0.1:9876 is taken by a process this script did not start"
    listening 10911 && die "127.0.0.1:10911 is taken by a process this script did not start"
    # A fresh store each start (changing timerPrecisionMs on an old store stops the broker),
    # unless bouncing: then the same store and config again.
    local dir="$STATE/rocketmq"
    if [ "${KEEP_STORE:-0}" = 1 ] && [ -f "$dir/broker.toml" ]; then
        :
    else
        unmount_store "$dir/store"
        rm -rf "$dir"
        mkdir -p "$dir/store"
        mount_store "$dir/store"
        write_broker_toml "$dir"
    fi
    start_rocketmq_processes "$dir"
}

# The broker refuses every write (SYSTEM_BUSY "store_not_writeable", which the client reports
# only as "Broker operation failed") while its store's file system is more than 90 % used,
# counted as (size - available) / size; the limit cannot be raised (rocketmq-store clamps
# diskSpaceWarningLevelRatio to 90). On these VMs the root file system reports 252 GB but has
# only what the host has left available (79 GB, then 15 GB within two hours on 2026-12-03; seen under 1 GB), so a second
# cargo target directory can push it over 90 % and the broker stops taking messages in the
# middle of a test run. So the store gets a tmpfs of its own, whose use is the broker's alone:
# ROCKETMQ_STORE_SIZE (default 12g; the store after a full CI run held 1.8 GB, mostly
# preallocated 1 GiB commit-log and 6 MB consume-queue files). Without the rights to mount,
# the store stays on the disk and the script says how full the disk counts as.
ROCKETMQ_STORE_SIZE="${ROCKETMQ_STORE_SIZE:-12g}"
mount_store() {
    local store=$1
    if mount -t tmpfs -o "size=$ROCKETMQ_STORE_SIZE,mode=0755" overdue-rocketmq "$store" 2>/dev/null; then
        log "rocketmq store on its own tmpfs ($ROCKETMQ_STORE_SIZE) at $store"
    else
        log "WARNING: could not mount a tmpfs for the rocketmq store; it stays on the disk, where the broker refuses writes above 90 % use: $(df -h --output=size,avail "$store" | tail -1)"
    fi
}
unmount_store() {
    local store=$1
    if mountpoint -q "$store" 2>/dev/null; then
        umount "$store" || die "could not unmount the old rocketmq store at $store"
    fi
}

write_broker_toml() {
    local dir=$1
    cat >"$dir/broker.toml" <<EOF
[broker]
namesrvAddr = "127.0.0.1:9876"
brokerIp1 = "127.0.0.1"
brokerIp2 = "127.0.0.1"
listenPort = 10911
storePathRootDir = "$dir/store"
autoCreateTopicEnable = true

[broker.brokerServerConfig]
bindAddress = "127.0.0.1"

[broker.brokerIdentity]
brokerName = "overdue-broker"
brokerClusterName = "overdue"
brokerId = 0

[broker.timerWheelConfig]
timerWheelEnable = true

[store]
storePathRootDir = "$dir/store"
timerWheelEnable = true
timerPrecisionMs = 100
haListenAddress = "127.0.0.1"
EOF
}

start_rocketmq_processes() {
    local dir=$1
    (
        cd "$dir"
        # Both need it: without it the name server exits at once with only "Service lifecycle
        # operation failed" in its log.
        export ROCKETMQ_HOME="$dir"
        exec "$BIN/rocketmq-namesrv-rust" --bindAddress 127.0.0.1 --listenPort 9876 \
            >>"$dir/namesrv.log" 2>&1
    ) &
    echo $! >"$STATE/rocketmq-namesrv.pid"
    wait_port "rocketmq name server" 9876 "$STATE/rocketmq-namesrv.pid" "$dir/namesrv.log"
    (
        cd "$dir"
        export ROCKETMQ_HOME="$dir"
        exec "$BIN/rocketmq-broker-rust" -c "$dir/broker.toml" -n 127.0.0.1:9876 \
            >>"$dir/broker.log" 2>&1
    ) &
    echo $! >"$STATE/rocketmq-broker.pid"
    wait_port "rocketmq broker" 10911 "$STATE/rocketmq-broker.pid" "$dir/broker.log"
    log "rocketmq (rocketmq-rust $ROCKETMQ_VERSION) name server 127.0.0.1:9876, broker 127.0.0.1:10911, store $dir"
}

stop_kafka() { stop_pid tansu "$STATE/tansu.pid"; }
stop_rocketmq() {
    stop_pid rocketmq-broker "$STATE/rocketmq-broker.pid"
    stop_pid rocketmq-namesrv "$STATE/rocketmq-namesrv.pid"
}

status() {
    for p in tansu:9092 rocketmq-namesrv:9876 rocketmq-broker:10911; do
        local name=${p%%:*} port=${p##*:} state=down
        listening "$port" && state=up
        printf '%-18s 127.0.0.1:%-6s %s\n' "$name" "$port" "$state"
    done
    local store="$STATE/rocketmq/store"
    if [ -d "$store" ]; then
        printf 'rocketmq store      %s\n' "$(df -h --output=source,size,used,avail,pcent "$store" | tail -1)"
    fi
}

cmd=${1:-}
which=${2:-all}
each() {
    case "$which" in
        all) "$1_kafka"; "$1_rocketmq" ;;
        kafka | rocketmq) "$1_$which" ;;
        *) die "unknown broker '$which' (kafka | rocketmq)" ;;
    esac
}
case "$cmd" in
    install) each install ;;
    start) each start ;;
    stop) each stop ;;
    restart) each stop; each start ;;
    bounce) each stop; KEEP_STORE=1 each start ;;
    status) status ;;
    *) die "usage: scripts/brokers.sh install|start|stop|restart|bounce|status [kafka|rocketmq]" ;;
esac
