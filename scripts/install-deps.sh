#!/usr/bin/env bash
# Install what `make run` (and, with --test, `make test`) needs on a fresh Debian machine.
#
# Idempotent: apt packages are installed only when missing, the virtualenv is created only
# when absent or broken, and pip runs only when pyproject.toml or constraints.txt changed
# since the last install (a sha256 stamp is kept inside .venv). A second run takes about a
# second. Every Python package is pinned by constraints.txt (`make lock` regenerates it), so
# a new upstream release changes nothing here until it is locked on purpose.
#
# Usage: scripts/install-deps.sh [--test]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

with_test=0
case "${1:-}" in
    "") ;;
    --test) with_test=1 ;;
    *) echo "usage: $0 [--test]" >&2; exit 2 ;;
esac

export DEBIAN_FRONTEND=noninteractive
VENV=.venv
STAMP="$VENV/.mailer-pyproject.sha256"

step() { printf '==> %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

#: Seconds to wait for another apt or dpkg (unattended-upgrades, a second shell) to finish,
#: retrying every APT_LOCK_POLL seconds.
APT_LOCK_WAIT=600
APT_LOCK_POLL=3

# apt-get with a wait for the locks another apt holds. DPkg::Lock::Timeout covers only
# dpkg's own lock; `apt-get update` takes the lists lock (and install the archives lock)
# without waiting, so a run that failed on a lock is retried until APT_LOCK_WAIT is spent.
# Output is shown only on failure (apt prints progress even with -qq).
apt_get() {
    local log deadline=$((SECONDS + APT_LOCK_WAIT)) waiting=0
    log=$(mktemp)
    until as_root apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT" "$@" >"$log" 2>&1; do
        if grep -qE 'Could not get lock|Unable to (acquire|lock)' "$log" \
            && [ "$SECONDS" -lt "$deadline" ]; then
            if [ "$waiting" -eq 0 ]; then
                step "waiting up to ${APT_LOCK_WAIT}s for another apt to release its lock"
                waiting=1
            fi
            sleep "$APT_LOCK_POLL"
        else
            cat "$log" >&2
            rm -f "$log"
            echo "apt-get $1 failed" >&2
            exit 1
        fi
    done
    rm -f "$log"
}

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" -eq 0 ]; then
        step "apt-get update"
        apt_get update -qq
        apt_updated=1
    fi
}

# Debian's maintainer scripts start a freshly installed redis/postgres/postfix/dovecot/
# rabbitmq on the default ports (6379/5432/25/143/5672) through invoke-rc.d. We run our
# own instances on our own ports and dirs, so a temporary policy-rc.d (exit 101 = "action
# forbidden") keeps those services from starting.
# An existing policy-rc.d (Docker images ship one) is left exactly as it is.
POLICY=/usr/sbin/policy-rc.d
our_policy=0
drop_policy() {
    if [ "$our_policy" -eq 1 ]; then as_root rm -f "$POLICY"; our_policy=0; fi
}
trap drop_policy EXIT

apt_install() {
    apt_update_once
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$POLICY" >/dev/null
        as_root chmod 755 "$POLICY"
        our_policy=1
    fi
    step "apt-get install $*"
    apt_get install -y -qq --no-install-recommends "$@"
    drop_policy
}

postgres_bin_present() {
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
        && compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null
}

# --- system packages -------------------------------------------------------------------
missing=()
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    missing+=(redis-server)
fi
if [ "$with_test" -eq 1 ]; then
    postgres_bin_present || missing+=(postgresql)
    # RabbitMQ, the other broker (MAILER_BROKER_URL=amqp://); tests/services.py runs a private
    # node with its own ports and epmd, so the packaged service must not start (policy-rc.d).
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
    command -v chromium >/dev/null || missing+=(chromium)
    # A real Postfix relay for tests/relays.py, with Dovecot's auth service for SMTP AUTH
    # (both live in /usr/sbin, which a non-root PATH may lack).
    [ -x /usr/sbin/postfix ] || missing+=(postfix)
    [ -x /usr/sbin/dovecot ] || missing+=(dovecot-core)
    # A real IMAP server for the bounce-mailbox poller's tests (tests/imap_server.py).
    [ -x /usr/lib/dovecot/imap ] || missing+=(dovecot-imapd)
    # SpamAssassin's local rules score every shipped template (tests/scenarios/test_spam_score.py).
    [ -x /usr/bin/spamassassin ] || missing+=(spamassassin)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
else
    step "system packages present"
fi

# --- virtualenv ------------------------------------------------------------------------
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c '' 2>/dev/null; then
    step "virtualenv $VENV present"
else
    step "creating virtualenv $VENV"
    rm -rf "$VENV"
    # Debian's own python3 lacks ensurepip until python3-venv is installed.
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        apt_install python3-venv
        python3 -m venv "$VENV"
    fi
fi

# --- Python packages -------------------------------------------------------------------
# The stamp holds "<sha256 of pyproject.toml and constraints.txt> <extras>"; a test install
# also satisfies a plain one, since it is a superset.
# Without constraints.txt (deleted to start over) the newest releases are installed.
CONSTRAINTS=constraints.txt
pins=()
if [ -f "$CONSTRAINTS" ]; then pins=("$CONSTRAINTS"); fi
want_sha=$(cat pyproject.toml "${pins[@]}" | sha256sum | cut -d' ' -f1)
have_sha="" have_extras=""
if [ -f "$STAMP" ]; then read -r have_sha have_extras <"$STAMP" || true; fi

if [ "$with_test" -eq 1 ]; then extras=test; target='.[test]'; else extras=none; target='.'; fi

if [ "$have_sha" = "$want_sha" ] && { [ "$extras" = none ] || [ "$have_extras" = test ]; }; then
    step "python packages up to date"
else
    pip_args=(install -q --disable-pip-version-check)
    if [ "${#pins[@]}" -eq 1 ]; then
        pip_args+=(-c "$CONSTRAINTS")
        step "pip install -c $CONSTRAINTS -e $target"
    else
        step "pip install -e $target (no $CONSTRAINTS: newest releases; make lock pins them)"
    fi
    # pip's log is shown only on failure: this machine's pip.conf names local indexes that
    # may be absent, and pip warns about each of them on every run.
    pip_log=$(mktemp)
    if ! "$VENV/bin/python" -m pip "${pip_args[@]}" -e "$target" >"$pip_log" 2>&1; then
        cat "$pip_log" >&2
        rm -f "$pip_log"
        echo "pip install failed" >&2
        exit 1
    fi
    rm -f "$pip_log"
    if [ "$extras" = none ] && [ "$have_sha" = "$want_sha" ]; then extras=$have_extras; fi
    printf '%s %s\n' "$want_sha" "$extras" >"$STAMP"
fi

step "dependencies ready"
