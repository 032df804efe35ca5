# nbdsnap: make demo | check | bench | install
#
# `make demo` and `make check` set up everything on a fresh Debian 12 machine
# (as root): Debian packages, a virtualenv with the project, and the daemons.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PREFIX ?= /usr/local

.PHONY: all host venv demo check unit real bench install clean

all: venv

host:
	sh tools/setup-host

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[server,test]'
	touch $@

# The main job end to end on this machine: a throwaway VM, nbd-server on
# loopback with the hooks, a 4-connection copy while the guest writes, the
# copy verified, the commit shown, everything cleaned up.
demo: host venv
	$(PY) -m lab.demo

# The whole test suite: fast unit tests, then the real ones (libvirtd, QEMU,
# nbd-server, nbdcopy).
check: host venv
	$(VENV)/bin/pytest -ra tests

unit: venv
	$(VENV)/bin/pytest -q tests/unit

real: host venv
	$(VENV)/bin/pytest -ra tests/real

bench: host venv
	$(PY) -m lab.bench

install:
	$(PYTHON) -m pip install '.[server]'

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
