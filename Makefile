# Install torch 2.13.0 first: any other torch request pulls a multi-GB CUDA build on this machine.
PY ?= python3
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test bench
install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'

demo: install
	adaptbank demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/single_task.py
