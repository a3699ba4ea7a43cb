# Two commands on a fresh machine:  make repro  (install + run the pipeline)  and  make test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-litert repro test test-fast serve browser clean

install: $(VENV)/.installed

# The library is deliberately not installed: stages run as `python -m stages.<name>` from the
# workspace root, so every workspace (a `dvc exp run --temp` copy too) runs its own code.
# Bytecode is compiled at install time on purpose: with PYTHONDONTWRITEBYTECODE=1 (set on these
# machines) nothing writes it later, and every stage process recompiled torch's modules
# (measured: a fresh-clone `make test` took 841 s with `--no-compile`, 579 s without).
$(VENV)/.installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# pytest-xdist: one worker per usable core (PYTEST_WORKERS=0: one process), a test file per worker
# at a time; the e2e file (its module-scoped repro) starts first (tests/conftest.py) on one of them.
# (Not --dist loadgroup: xdist 3.8's xdist_group marks do nothing under pytest 9.)
PYTEST_WORKERS ?= $(shell nproc 2>/dev/null || echo auto)
test: install install-litert browser
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) \
	  --dist loadfile --no-loadscope-reorder

# Everything but the end-to-end `dvc repro` (tests/test_pipeline_e2e.py): the loop while editing.
test-fast: install install-litert browser
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) \
	  --dist loadfile --no-loadscope-reorder -m "not e2e"

# The web UI for the gated release model on http://127.0.0.1:8000/, served by waitress with request
# timeouts and at most 2 uploads decoded at once (SERVE_ARGS="--allow-ungated --max-decodes 4" ...)
serve: install
	$(BIN)/python -m resnet_slim.serve $(SERVE_ARGS)

# tests/test_serve_browser.py drives Debian's chromium; as root with apt-get, install it.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq chromium; \
	  else \
	    echo "note: chromium not found; the browser test will be skipped (apt-get install chromium)"; \
	  fi; }

# The LiteRT converter for export.targets: [tflite] (requirements-targets.txt says why it has its
# own environment). .venv's site-packages are appended to its path, so torch is not installed twice.
# resnet_slim/measure/targets.py looks for it at this path.
LITERT_VENV := .venv-litert
install-litert: $(LITERT_VENV)/.installed

$(LITERT_VENV)/.installed: requirements-targets.txt $(VENV)/.installed
	rm -rf $(LITERT_VENV)
	$(BIN)/python -m venv $(LITERT_VENV)
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > \
	  "$$($(LITERT_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_main_venv.pth"
	@# pip's note that .venv's pydantic wants typing-extensions>=4.16 is expected: not used here
	$(LITERT_VENV)/bin/python -m pip install --quiet -c requirements.txt \
	  -r requirements-targets.txt
	touch $@

clean:
	rm -rf $(VENV)
