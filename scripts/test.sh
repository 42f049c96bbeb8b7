#!/usr/bin/env bash
# `make test`: lint, type-check, then the whole suite on SQLite and again on PostgreSQL.
# The tests start their own Redis, PostgreSQL and SMTP servers on free loopback ports.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "==> ruff"
.venv/bin/ruff check mailer workers suppression tests bench
echo "==> mypy"
.venv/bin/mypy
echo "==> pytest on SQLite"
MAILER_TEST_DB=sqlite .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
echo "==> pytest on PostgreSQL (database-backed tests)"
MAILER_TEST_DB=postgresql .venv/bin/python -m pytest -q -p no:cacheprovider -m "db" "$@"
