#!/usr/bin/env bash
# The Kafka-protocol (tansu) and RocketMQ (rocketmq-rust) brokers for the kafka:// and
# rocketmq:// backends' tests: builds the pinned binaries when missing (the first run on a fresh
# machine pays about 40 minutes; later runs find them), then starts both on 127.0.0.1. Fails
# loudly if it cannot.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/brokers.sh install
# A fresh store each run: the tests leave their topics behind (see crates/overdue-kafka/tests).
bash scripts/brokers.sh restart
bash scripts/brokers.sh status
