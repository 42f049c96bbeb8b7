#!/usr/bin/env bash
# `make run`: install, start Redis (AOF on) on 127.0.0.1:6379, migrate the SQLite database
# and run API + worker + scheduler + capturing SMTP sink in the foreground until Ctrl-C.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh
mkdir -p var
export MAILER_ENV="${MAILER_ENV:-development}"
export MAILER_POSTAL_ADDRESS="${MAILER_POSTAL_ADDRESS:-Example Ltd, 1 Example Street, 00000 Example City}"
redis_port="${MAILER_REDIS_PORT:-6379}"
export MAILER_REDIS_URL="${MAILER_REDIS_URL:-redis://127.0.0.1:${redis_port}/0}"

started_redis=0
if [ "$(redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null)" != PONG ]; then
    bash scripts/start-redis.sh var/redis "$redis_port"
    started_redis=1
fi
stop_redis() {
    # Stop only the Redis this script started, by its pidfile.
    if [ "$started_redis" -eq 1 ] && [ -f var/redis/redis.pid ]; then
        kill "$(cat var/redis/redis.pid)" 2>/dev/null || true
    fi
}
trap stop_redis EXIT

.venv/bin/mailer db upgrade
.venv/bin/mailer dev "$@"
