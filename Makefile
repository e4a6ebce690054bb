# Two entry points for a fresh machine (see README.md):
#   make health   set up a virtualenv and run the one-shot health check on built-in defaults
#   make test     set up everything (also QEMU and a real modular kernel) and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: health test lint unit vm packaging clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

health: $(BIN)/.installed
	$(BIN)/ctwatchd check

lint: $(BIN)/.installed
	$(BIN)/ruff check ctwatchd tests bench
	# Each test tier is its own import root (conftest.py in each), so mypy checks them one by one.
	MYPYPATH=tests/vm:tests/unit:tests/vm/systemd $(BIN)/mypy ctwatchd bench
	for d in tests/*/; do $(BIN)/mypy "$$d" || exit 1; done

unit: $(BIN)/.installed
	# Two unit tests run kmod's real modprobe (the protect guard, the example's modprobe path); as root
	# on a machine without it, install it, as tests/vm/prepare.sh does for the VM tier.
	command -v modprobe >/dev/null || [ "$$(id -u)" != 0 ] || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kmod >/dev/null; }
	$(BIN)/pytest -q tests/unit

vm: $(BIN)/.installed
	VENV=$(abspath $(VENV)) bash tests/vm/prepare.sh
	bash tests/vm/systemd/build-root.sh
	# The DaemonSet image's base, for the offline `docker build` in the docker boot (test_docker.py).
	base=$${CTWATCHD_VM_CACHE:-.cache/vm}/ctwatchd-base.tar; \
	  [ -s "$$base" ] || bash packaging/kubernetes/build-base.sh "$$base"
	$(BIN)/pytest -q tests/vm

packaging: $(BIN)/.installed
	bash packaging/install-build-deps.sh
	$(BIN)/pytest -q tests/packaging

test: lint unit packaging vm

clean:
	rm -rf $(VENV) .cache build dist *.egg-info
