# The two set-up commands of the README: `make run` and `make test`. Both install what they
# need on a fresh Debian machine (apt packages, a .venv) before doing anything else.
.PHONY: run test lint bench lock

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

# Pin what .venv holds now (every distribution but the editable project itself) in
# constraints.txt, which install-deps.sh passes to pip. Run it on purpose: after upgrading a
# package in .venv and seeing `make test` pass, or after `rm -rf .venv constraints.txt` to
# take every newest release. A package installed from a local file is pinned by version.
lock:
	bash scripts/install-deps.sh --test
	{ echo '# Pins for pip -c, written by `make lock` from .venv (pip freeze --exclude-editable): regenerate, do not edit.'; \
	  .venv/bin/python -m pip freeze --exclude-editable --disable-pip-version-check 2>/dev/null \
	  | .venv/bin/python -c 'import sys, importlib.metadata as m; name = lambda l: l.partition(" @ ")[0]; print("\n".join(name(l) + "==" + m.version(name(l)) if " @ " in l else l for l in sys.stdin.read().splitlines()))'; \
	} >constraints.txt.tmp
	grep -q '==' constraints.txt.tmp || { rm -f constraints.txt.tmp; echo 'pip freeze listed nothing' >&2; exit 1; }
	mv constraints.txt.tmp constraints.txt
	@echo "constraints.txt: $$(grep -c '==' constraints.txt) pins"
