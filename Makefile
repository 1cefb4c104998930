# smtpguard entry points. `make run` and `make test` work on a fresh Debian
# host as root: both run `make setup` first, which installs what is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
SG     := $(VENV)/bin/smtpguard
PYTEST ?= -q

.PHONY: setup run test deb test-unit test-reliability test-hypervisor test-system lint bench install uninstall clean-lab help

help:
	@echo "make setup    install Debian packages, kernel headers, the venv (.venv/)"
	@echo "make run      lab + agent on the built-in default policy, live table (Ctrl-C ends)"
	@echo "make test     lint, then unit, BPF, integration, short reliability, hypervisor and system tests (root)"
	@echo "make test-reliability  the long reliability suite: 100 kills, 500-interface churn (root)"
	@echo "make test-hypervisor   only the real-hypervisor tier: libvirtd + QEMU guests (root; part of make test)"
	@echo "make test-system       only the system tier: the Debian package (install, upgrade, purge) and make install under systemd in a Debian 12 QEMU machine, vagrant up (root; part of make test)"
	@echo "make lint     ruff and mypy"
	@echo "make bench    benchmarks beside their baselines, one table (root; BENCH=\"reaction apply\" for some)"
	@echo "make deb      the Debian package: build/deb/smtpguard_<version>_amd64.deb, lintian-checked (root)"
	@echo "make install  development install from the checkout: /opt/smtpguard, the unit, /etc/smtpguard"
	@echo "make uninstall  remove them (config and state kept; PURGE=1 removes those too)"
	@echo "make clean-lab remove a lab left behind by a killed run"

setup:
	@scripts/setup.sh

run: setup
	$(SG) lab demo

lint: setup
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/mypy

test: lint
	@scripts/setup.sh --test
	@scripts/hypervisor-setup.sh
	@scripts/system-image.sh >/dev/null
	$(PY) -m pytest $(PYTEST)

test-reliability: setup
	@scripts/setup.sh --test
	SMTPGUARD_RELIABILITY=full $(PY) -m pytest $(PYTEST) -s tests/reliability

test-hypervisor: setup
	@scripts/setup.sh --test
	@scripts/hypervisor-setup.sh
	$(PY) -m pytest $(PYTEST) tests/hypervisor

# -v and the tier's timing lines: what it checked, and how long each step took.
test-system: setup
	@scripts/setup.sh --test
	@scripts/hypervisor-setup.sh
	@scripts/system-image.sh >/dev/null
	$(PY) -m pytest -v -p no:cacheprovider tests/system

test-unit: setup
	$(PY) -m pytest $(PYTEST) tests/unit

clean-lab: setup
	$(SG) lab down

deb:
	@scripts/deb.sh

bench: setup
	$(PY) bench/run.py $(BENCH)

# The classifier is compiled once here and stored in the state dir, so the
# first start after boot loads it instead of compiling (not under DESTDIR:
# another kernel runs there). A failure only costs that start the compile.
install:
	scripts/install.sh
	$(if $(DESTDIR),,/opt/smtpguard/venv/bin/python -m smtpguard.datapath.compile --prime \
		--cache-dir /var/lib/smtpguard/bpf-cache >/dev/null || \
		echo "install: classifier not stored (the first start compiles it)" >&2)

uninstall:
	scripts/install.sh --uninstall $(if $(PURGE),--purge)
