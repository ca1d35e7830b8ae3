# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium

.PHONY: setup serve test soak lint builtin-model builtin-lora bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# spandrel (the [upscale] extra) goes in without its torchvision dependency, which would pull a CUDA torch over this
# CPU one: `upscale --upscaler` and the tests run spandrel's ESRGAN-family models without it (engine/spandrel_import.py;
# README: Keep and upscale).
# torch first, pinned: the CPU build that lies on this disk (a loose `torch` would pull a CUDA build).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,openvino,ray,tome]"
	$(BIN)/pip install -q --no-deps "spandrel>=0.4" "einops>=0.7"
	touch $(STAMP)

setup: $(STAMP)

$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

serve: $(STAMP)
	$(BIN)/lcm-live serve

# The suite in parallel (pytest-xdist, one worker a core, at most 4): 9.5 min on the 2-core machine against
# 12.8-15.3 min in one process; tests take their ports, folders and caches for themselves, so they may share a machine.
test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q --numprocesses auto --maxprocesses 4 --durations 15

# The long soak (issue 13): 32 clients for 5 minutes with faults injected; `make test` runs a 60 s version.
soak: $(STAMP)
	$(BIN)/python -m lcm_live.bench.bench_ws --clients 32 --max-sessions 32 --duration 300 --faults default \
		--json soak.json

lint: $(STAMP)
	$(BIN)/ruff check src tests

builtin-model: $(STAMP)
	$(BIN)/python -m lcm_live.training.recipe

# The LCM-LoRA and the outline style (issue 18) alone, on the shipped builtin:shapes-teacher.
builtin-lora: $(STAMP)
	$(BIN)/python -m lcm_live.training.lora_recipe

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
