# The README's commands: `make demo`, `make test` (`make test-fast` for the inner loop). Each
# creates .venv on first use.
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed
WORKDIR ?= runs/demo

.PHONY: demo test test-fast bench plan clean

$(INSTALLED): setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(INSTALLED)

# Pre-train a small ViT on the embedded digits, then fine-tune it at a higher resolution.
demo: $(INSTALLED)
	$(VENV)/bin/python -m vit_jax.main --config=configs/digits.py:pretrain \
	    --workdir=$(WORKDIR)/pretrain
	$(VENV)/bin/python -m vit_jax.main --config=configs/digits.py:finetune \
	    --workdir=$(WORKDIR)/finetune --config.pretrained_path=$(WORKDIR)/pretrain/model.npz
	$(VENV)/bin/python -m vit_jax.report $(WORKDIR)/pretrain $(WORKDIR)/finetune

# Every test, on 2 workers; prints the 25 slowest.
test: $(INSTALLED)
	$(VENV)/bin/python -m pytest -q -n 2 --durations=25 tests

# Every unit and numerics test: no training run, no subprocess (pytest.ini's `slow` marker).
test-fast: $(INSTALLED)
	$(VENV)/bin/python -m pytest -q -n 2 -m 'not slow' --durations=10 tests

# vit_jax against PyTorch timm and transformers on this machine (installs the `bench` extra).
bench: $(INSTALLED)
	$(VENV)/bin/pip install --quiet -e '.[bench]'
	$(VENV)/bin/python benchmarks/compare.py --models ViT-Ti_16 ViT-S_16 --res 224 --batch 32
	$(VENV)/bin/python benchmarks/input_pipeline.py
	$(VENV)/bin/python benchmarks/hf_interop.py

# docs/hardware.md: which recipe fits which TPU slice, from the XLA:TPU compiler (libtpu, no TPU).
plan: $(INSTALLED)
	$(VENV)/bin/python benchmarks/hardware_table.py --out docs/hardware.md

clean:
	rm -rf $(VENV) runs
