# AFS — the two commands a newcomer runs: `make demo` and `make test` (as root on Debian).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
QUICK   ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-all test-quick bench chaos sim clean

# ---- set-up: Debian fuse3, a virtualenv, the package (idempotent) ----
setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@missing=""; \
	  command -v fusermount3 >/dev/null 2>&1 && ldconfig -p | grep -q libfuse3.so || missing="$$missing fuse3 libfuse3-3"; \
	  command -v iptables >/dev/null 2>&1 || missing="$$missing iptables"; \
	  command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	  if [ -n "$$missing" ]; then \
	    echo "== installing Debian packages:$$missing"; \
	    if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	    else echo "missing:$$missing - run as root or 'sudo apt-get install$$missing'"; exit 1; fi; fi
	@echo "== creating $(VENV) and installing afs"
	@$(PY) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip >/dev/null 2>&1 || true
	@$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

demo: setup
	@$(BIN)/afs dev-cluster --size 3 --dir demo-data --load examples --mount demo-data/mnt

# The whole suite: unit, simulator (500 seeds), integration, fuse, fault quick profile.
# Extended variants of those suites are marked `slow` and run with `make test-all`.
test: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# A fast profile for development: no slow/fault/fuse suites.
test-quick: setup
	$(BIN)/python -m pytest -m "not slow and not fault and not fuse" $(PYTEST_ARGS)

sim: setup
	$(BIN)/python -m afs.testing.sim --seeds 5000

bench: setup
	$(BIN)/python -m bench.run $(if $(QUICK),--quick,)

chaos: setup
	$(BIN)/python -m afs.testing.chaos --profile long --sync-tracker

clean:
	rm -rf $(VENV) *.egg-info build dist demo-data .pytest_cache .hypothesis
