# `make train`: the main job. Build .venv (Python 3.11) if needed, install, train a sentencepiece
# tokenizer on the embedded KJV corpus (cached in WORKDIR), then train a small DBRX on 8 simulated
# CPU devices with expert parallelism (configs/demo.py, about 6 minutes on 2 cores).
# `make test`: the whole suite (notebooks included); `make test-quick`: the unit tests only
# (pytest -m "not slow"). `make notebooks`: re-run and save them.
# `make lint`: ruff.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

WORKDIR ?= runs/demo
SIMULATED_DEVICES := XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: install train test test-quick notebooks lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: setup.py pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,dev]'
	touch $@

install: $(VENV)/.installed

train: install
	$(BIN)/python experiments/train_tokenizer.py --config=configs/demo.py --workdir=$(WORKDIR)
	$(SIMULATED_DEVICES) $(BIN)/python experiments/train.py --config=configs/demo.py \
		--workdir=$(WORKDIR)

test: install
	$(BIN)/python -m pytest -q -n auto tests

test-quick: install
	$(BIN)/python -m pytest -q -n auto -m "not slow" tests

# Re-run the notebooks from their .py twins and save the .ipynb with outputs and figures.
notebooks: install
	$(BIN)/python notebooks/execute.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
