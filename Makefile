# dadi: every target sets up what it needs on a fresh Debian machine (run as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .cache/stamps
APT_PACKAGES := e2fsprogs fuse3 libfuse3-dev pkg-config docker-registry umoci skopeo \
	debootstrap busybox-static apache2-utils zstd gcc python3-dev util-linux \
	containerd runc iproute2 liblz4-dev libxxhash-dev

.PHONY: install apt venv native test test-fast demo bench lint clean

install: apt venv native

# Debian packages the project and its tests use; skipped when all are present already.
apt: $(STAMPS)/apt
$(STAMPS)/apt: Makefile
	@mkdir -p $(STAMPS)
	@if dpkg-query -W -f='$${Status}\n' $(APT_PACKAGES) 2>/dev/null | grep -vq 'install ok installed' \
	    || [ $$(dpkg-query -W -f='$${Status}\n' $(APT_PACKAGES) 2>/dev/null | wc -l) -lt $(words $(APT_PACKAGES)) ]; then \
	  echo "apt-get: installing $(APT_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi
	@touch $@

venv: $(STAMPS)/venv
$(STAMPS)/venv: pyproject.toml setup.py
	@mkdir -p $(STAMPS)
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip setuptools wheel
	@$(PY) -m pip install -q -e '.[test]'
	@touch $@

# The C hot paths (dadi._native); rebuilt when their source changes.
native: $(STAMPS)/native
$(STAMPS)/native: native/dadi_native.c native/dadi_fastfs.c setup.py $(STAMPS)/venv
	@$(PY) setup.py -q build_ext --inplace >/dev/null
	@touch $@

test: install
	$(PY) -m pytest -q tests

# The quick tiers only (no Debian image build).
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

demo: install
	$(PY) tools/demo.py

bench: install
	$(PY) tools/bench/run.py

lint: install
	$(VENV)/bin/ruff check dadi tests tools

clean:
	rm -rf $(VENV) .cache build dadi/*.so
