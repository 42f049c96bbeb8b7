# The two set-up commands of the README: `make run` and `make test`. Both install what they
# need on a fresh Debian machine (apt packages, a .venv) before doing anything else.
.PHONY: run test lint bench

run:
	bash scripts/run.sh

test:
	bash scripts/install-deps.sh --test
	bash scripts/test.sh

lint:
	.venv/bin/ruff check mailer workers suppression tests bench
	.venv/bin/mypy

bench:
	bash scripts/install-deps.sh --test
	.venv/bin/python bench/run.py
