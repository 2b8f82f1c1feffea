# The two set-up commands of the README. Both install everything first (idempotent, seconds when
# already installed; about 20 minutes on a new 2-core machine, most of it building mmcv's ops).
PY := .venv/bin/python

.PHONY: install demo test

install:
	bash scripts/install.sh

# Main job: train (or reuse) a float ResNet-18 on Fashion-MNIST, quantize it, print the table.
demo: install
	$(PY) tools/quickstart.py

test: install
	$(PY) -m pytest -q
