# fsrecrypt — every target creates or refreshes the virtualenv it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast bench lint services browser install-service clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Make sure the real parts the tests and demo need are up. PostgreSQL is a
# system service here; the moto S3/KMS server and the ESL server are started
# by the test fixtures themselves as separate processes.
services:
	@bash .ci/ensure-postgres

# Chromium, its chromedriver and selenium: only the browser test needs them,
# so only `make test` installs them (never `make demo` or `make bench`).
browser: venv
	@PYTHON=$(abspath $(BIN))/python bash tests/support/browser_setup.sh

demo: venv services
	$(BIN)/python demo/run.py

test: venv services browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: venv services
	$(BIN)/python bench/run.py

lint: venv
	$(BIN)/ruff check fsrecrypt tests bench demo
	$(BIN)/ruff format --check fsrecrypt tests bench demo

# Install fsrecrypt as a systemd service on this machine (as root): user and
# group, /etc/fsrecrypt, credentials placeholders, /var/lib/fsrecrypt, the
# virtualenv in /opt/fsrecrypt and the unit. Options go in INSTALL_ARGS, e.g.
# `make install-service INSTALL_ARGS="--prefix /srv/fsrecrypt"`.
install-service:
	bash deploy/install-service $(INSTALL_ARGS)

clean:
	rm -rf $(VENV) .demo .pytest_cache .hypothesis *.egg-info
