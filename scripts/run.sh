#!/usr/bin/env bash
# `make run`: install, start Redis (AOF on), migrate the SQLite database, write .env, and run
# API + worker + scheduler + capturing SMTP sink in the foreground until Ctrl-C.
#
# Ports come from the environment (SPEC 10): MAILER_REDIS_URL (default
# redis://127.0.0.1:6379/0), PORT (the API, default 8000, as in the Procfile),
# MAILER_SMTP_PORT (the sink, default 1025) and MAILER_SINK_VIEW_PORT (the sink's web view of
# the captured mail, default 8025 as MailHog's). A port held by anything but this checkout's own
# Redis (the one keeping its data in var/redis) is reported in one line naming the variable
# to set, and nothing starts: reusing a stranger's Redis would mix our queue into its data.
#
# .env receives the development settings, so `mailer` commands run from this directory in
# another terminal use the same database, Redis and sink (a variable set there still wins).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd -P)

bash scripts/install-deps.sh
mkdir -p var
py=.venv/bin/python

export MAILER_ENV="${MAILER_ENV:-development}"
export MAILER_POSTAL_ADDRESS="${MAILER_POSTAL_ADDRESS:-Example Ltd, 1 Example Street, 00000 Example City}"
export MAILER_REDIS_URL="${MAILER_REDIS_URL:-redis://127.0.0.1:6379/0}"
export MAILER_DATABASE_URL="${MAILER_DATABASE_URL:-sqlite:///${root}/var/mailer.db}"
export MAILER_SMTP_HOST="${MAILER_SMTP_HOST:-127.0.0.1}"
export MAILER_SMTP_PORT="${MAILER_SMTP_PORT:-1025}"
export MAILER_SINK_VIEW_PORT="${MAILER_SINK_VIEW_PORT:-8025}"
api_port="${PORT:-8000}"
export MAILER_PUBLIC_URL="${MAILER_PUBLIC_URL:-http://127.0.0.1:${api_port}}"

fail() { echo "make run: $*" >&2; exit 1; }
for pair in "PORT=$api_port" "MAILER_SMTP_PORT=$MAILER_SMTP_PORT" \
            "MAILER_SINK_VIEW_PORT=$MAILER_SINK_VIEW_PORT"; do
    value=${pair#*=}
    [[ "$value" =~ ^[0-9]+$ ]] && [ "$value" -ge 1 ] && [ "$value" -le 65535 ] \
        || fail "${pair%%=*} must be a port number, not '$value'"
done

# Something accepts TCP connections on 127.0.0.1:$1.
port_taken() { (: <>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}
clash() {  # clash PORT WHAT VARIABLE EXAMPLE-WITH-%s
    local suggestion
    # shellcheck disable=SC2059
    suggestion=$(printf "$4" "$(free_port)")
    fail "127.0.0.1:$1 is taken by $2: set $3 to a free port, e.g. $suggestion"
}

# --- Redis -----------------------------------------------------------------------------
# Only a loopback Redis named by MAILER_REDIS_URL is ours to start; any other is used as is.
read -r redis_scheme redis_host redis_port < <("$py" - "$MAILER_REDIS_URL" <<'EOF'
import sys
from urllib.parse import urlsplit
try:
    parts = urlsplit(sys.argv[1])
    print(parts.scheme or "-", parts.hostname or "-", parts.port or 6379)
except ValueError:
    print("- - -")
EOF
)
[ "$redis_scheme" = redis ] || [ "$redis_scheme" = rediss ] \
    || fail "MAILER_REDIS_URL must look like redis://127.0.0.1:6379/0, not '$MAILER_REDIS_URL'"
redis_dir="$root/var/redis"
started_redis=0
stop_redis() {
    # Stop only the Redis this script started, by its pidfile, and wait for it to exit.
    if [ "$started_redis" -eq 1 ] && [ -f "$redis_dir/redis.pid" ]; then
        local pid
        pid=$(cat "$redis_dir/redis.pid")
        kill "$pid" 2>/dev/null || return 0
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
        echo "make run: Redis (pid $pid) did not stop within 5 s" >&2
    fi
}
trap stop_redis EXIT

if [ "$redis_scheme" = redis ] && [[ "$redis_host" = 127.0.0.1 || "$redis_host" = localhost ]]; then
    if port_taken "$redis_port"; then
        # Ours if it keeps its data in this checkout's var/redis (a crashed earlier run).
        their_dir=$(timeout 3 redis-cli -h 127.0.0.1 -p "$redis_port" config get dir 2>/dev/null \
            | sed -n 2p || true)
        if [ "$their_dir" = "$redis_dir" ]; then
            echo "==> reusing this checkout's Redis on 127.0.0.1:$redis_port"
        else
            clash "$redis_port" "a program other than this checkout's Redis (var/redis)" \
                MAILER_REDIS_URL "MAILER_REDIS_URL=redis://127.0.0.1:%s/0"
        fi
    else
        # Our Redis from an earlier run may still hold var/redis on another port: two
        # servers appending to one AOF file would corrupt it.
        old_pid=$(cat "$redis_dir/redis.pid" 2>/dev/null || true)
        old_cmd=$( { tr '\0' ' ' <"/proc/${old_pid:-0}/cmdline"; } 2>/dev/null || true)
        if [[ "$old_cmd" == redis-server* ]]; then
            # A running redis-server shows its address as its command line.
            old_port=$(grep -oE ':[0-9]+' <<<"$old_cmd" | head -n 1 | tr -d :)
            fail "this checkout's Redis from an earlier run still runs (pid $old_pid, data in" \
                "var/redis): set MAILER_REDIS_URL=redis://127.0.0.1:${old_port:-PORT}/0" \
                "or stop it with 'kill $old_pid'"
        fi
        bash scripts/start-redis.sh "$redis_dir" "$redis_port"
        started_redis=1
    fi
elif ! timeout 5 redis-cli -u "$MAILER_REDIS_URL" ping >/dev/null 2>&1; then
    fail "the Redis named by MAILER_REDIS_URL does not answer PING"
fi

# --- API and sink ports ----------------------------------------------------------------
port_taken "$api_port" && clash "$api_port" "another program (wanted for the API)" PORT "PORT=%s"
port_taken "$MAILER_SMTP_PORT" && clash "$MAILER_SMTP_PORT" \
    "another program (wanted for the SMTP sink)" MAILER_SMTP_PORT "MAILER_SMTP_PORT=%s"
port_taken "$MAILER_SINK_VIEW_PORT" && clash "$MAILER_SINK_VIEW_PORT" \
    "another program (wanted for the sink's web view)" MAILER_SINK_VIEW_PORT \
    "MAILER_SINK_VIEW_PORT=%s"

# --- .env for the commands of a second terminal ----------------------------------------
marker='# Written by `make run`'
if [ -e .env ] && [[ "$(head -n 1 .env)" != "$marker"* ]]; then
    echo "==> leaving .env as it is (not written by make run)"
else
    {
        echo "$marker on each start (scripts/run.sh): the development settings that \`mailer\`"
        echo "# commands run in this directory read. A variable set in the shell wins over it."
        for name in MAILER_ENV MAILER_DATABASE_URL MAILER_REDIS_URL MAILER_SMTP_HOST \
                    MAILER_SMTP_PORT MAILER_SINK_VIEW_PORT MAILER_PUBLIC_URL \
                    MAILER_POSTAL_ADDRESS; do
            printf "%s='%s'\n" "$name" "${!name}"
        done
    } >.env.tmp
    mv .env.tmp .env
    echo "==> wrote .env (API on 127.0.0.1:$api_port, SMTP sink on 127.0.0.1:$MAILER_SMTP_PORT)"
fi

.venv/bin/mailer db upgrade
.venv/bin/mailer dev --port "$api_port" "$@"
