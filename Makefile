# Two commands: `make demo` and `make test`. Each builds .venv when it is missing or older than
# pyproject.toml (plain pip: torch and torchvision come from the machine's local wheels).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin

.PHONY: demo test venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/selfsup train --config configs/demo_simclr_sample.yaml --overwrite

# Two pytest-xdist workers of one thread each (tests/conftest.py): the tests' networks are small,
# so two side by side run nearly twice as fast as one on two threads. TEST_WORKERS=0 runs them in
# this process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist load --maxschedchunk 1

# The competitors (lightly, kornia, pytorch-metric-learning) are the `bench` extra; each script
# prints its ratios against them, measured in the same run.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/augment.py
	$(BIN)/python benchmarks/loss.py

clean:
	rm -rf $(VENV) runs
