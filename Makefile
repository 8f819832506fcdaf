# AFS — the two commands a newcomer runs: `make demo` and `make test` (as root on Debian).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
QUICK   ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-quick test-slow bench chaos sim clean

# ---- set-up: Debian fuse3, a virtualenv, the package (idempotent) ----
setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@if ! command -v fusermount3 >/dev/null 2>&1 || ! ldconfig -p | grep -q libfuse3.so; then \
	  echo "== installing Debian fuse3"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 libfuse3-3 >/dev/null; \
	  else echo "fuse3 missing: run as root or 'sudo apt-get install fuse3'"; exit 1; fi; fi
	@echo "== creating $(VENV) and installing afs"
	@$(PY) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip >/dev/null 2>&1 || true
	@$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

demo: setup
	@$(BIN)/afs dev-cluster --size 3 --dir demo-data --load examples --mount demo-data/mnt

# The whole suite: unit, simulator (500 seeds), integration, fuse, fault quick profile.
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# A fast profile for development: no slow/fault/fuse suites.
test-quick: setup
	$(BIN)/python -m pytest -m "not slow and not fault and not fuse" $(PYTEST_ARGS)

sim: setup
	$(BIN)/python -m afs.testing.sim --seeds 5000

bench: setup
	$(BIN)/python -m bench.run $(if $(QUICK),--quick,)

chaos: setup
	$(BIN)/python -m afs.testing.chaos --profile long

clean:
	rm -rf $(VENV) *.egg-info build dist demo-data .pytest_cache .hypothesis
