# nbdsnap: make demo | check | bench | install
#
# `make demo` and `make check` set up everything on a fresh Debian 12 machine
# (as root): Debian packages, a virtualenv with the project, and the daemons.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
SYSCONFDIR ?= /etc
# `make install` puts the project in a virtualenv of its own that sees
# Debian's python3-libvirt and python3-lxml (no compiler needed), and links
# the commands into BINDIR.
INSTALL_VENV ?= /opt/nbdsnap
SYSTEM_PYTHON ?= /usr/bin/python3
UNITDIR ?= /etc/systemd/system

MANPAGES := $(patsubst %.rst,%,$(wildcard man/*.rst))

.PHONY: all host venv demo check unit real bench man install uninstall deb clean

all: venv man

# Man pages: reStructuredText sources, built to roff by docutils' rst2man:
# Debian's (python3-docutils) where installed, so that `make install` on a
# VM host needs no virtualenv of ours; else the one in the project's venv.
SYSTEM_RST2MAN := $(shell command -v rst2man 2>/dev/null)
RST2MAN ?= $(if $(SYSTEM_RST2MAN),$(SYSTEM_RST2MAN),$(VENV)/bin/rst2man)
RST2MAN_DEPS := $(if $(SYSTEM_RST2MAN),,venv)

man: $(MANPAGES)

man/%: man/%.rst $(RST2MAN_DEPS)
	$(RST2MAN) $< $@

host:
	sh tools/setup-host

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[server,test]'
	touch $@

# The main job end to end on this machine: a throwaway VM, nbd-server on
# loopback with the hooks, nbd-pull's 4-connection pull while the guest
# writes, the copy verified, the commit shown, a refresh that moves only
# what the guest wrote; then the failover: a small Debian guest pulled with
# --define, the original stopped, the standby booted from the copy and its
# files read back through its agent; everything cleaned up.
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

MANDIR ?= $(PREFIX)/share/man

# The Debian packages, as Debian builds its own Python packages (debhelper,
# dh-python): nbdsnap for VM hosts, nbdsnap-client for clone hosts, both
# written by dpkg-buildpackage into this folder's parent.  It installs the
# build dependencies (debian/control) when some are missing, nothing else.
# Debian's python3 builds them, not one a version manager put first on PATH.
deb:
	dpkg-checkbuilddeps 2>/dev/null || \
	    DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq \
	    -o DPkg::Lock::Timeout=600 .
	PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b

install: man
	$(SYSTEM_PYTHON) -m venv --system-site-packages $(INSTALL_VENV)
	$(INSTALL_VENV)/bin/pip install -q '.[server]'
	install -d $(BINDIR)
	for c in nbd-prerun nbd-postrun nbdsnap nbd-verify nbd-pull; do \
	    ln -sf $(INSTALL_VENV)/bin/$$c $(BINDIR)/$$c; done
	test -e $(SYSCONFDIR)/nbdsnap.conf || \
	    install -D -m 0644 contrib/nbdsnap.conf $(SYSCONFDIR)/nbdsnap.conf
	install -d $(SYSCONFDIR)/libvirt/hooks/qemu.d
	sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@CONFIG@|$(SYSCONFDIR)/nbdsnap.conf|g' \
	    contrib/libvirt-hook-qemu.in > $(SYSCONFDIR)/libvirt/hooks/qemu.d/nbdsnap
	chmod 0755 $(SYSCONFDIR)/libvirt/hooks/qemu.d/nbdsnap
	install -d $(UNITDIR)
	sed -e 's|@BINDIR@|$(BINDIR)|g' contrib/nbdsnap-recover.service.in \
	    > $(UNITDIR)/nbdsnap-recover.service
	sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@ARGSDIR@|$(SYSCONFDIR)/nbdsnap/pull|g' \
	    contrib/nbd-pull@.service.in > $(UNITDIR)/nbd-pull@.service
	install -m 0644 contrib/nbd-pull@.timer $(UNITDIR)/nbd-pull@.timer
	install -d $(SYSCONFDIR)/nbdsnap/pull
	for m in $(MANPAGES); do s=$${m##*.}; \
	    install -D -m 0644 $$m $(MANDIR)/man$$s/$$(basename $$m); done
	@echo "installed; enable recovery at boot: systemctl enable nbdsnap-recover"
	@echo "restart libvirtd once: it runs qemu.d hooks only if it saw one at its start"

uninstall:
	rm -f $(addprefix $(BINDIR)/,nbd-prerun nbd-postrun nbdsnap nbd-verify nbd-pull)
	rm -f $(SYSCONFDIR)/libvirt/hooks/qemu.d/nbdsnap
	rm -f $(UNITDIR)/nbdsnap-recover.service $(UNITDIR)/nbd-pull@.service \
	    $(UNITDIR)/nbd-pull@.timer
	for m in $(MANPAGES); do s=$${m##*.}; \
	    rm -f $(MANDIR)/man$$s/$$(basename $$m); done
	rm -rf $(INSTALL_VENV)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
