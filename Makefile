# pycurv: `make bench` (the main job), `make test`, `make convergence`, `make cuda-check`. Each sets up what it
# needs from nothing.
#
# On a machine whose python3 already has torch (and no network), `make bench PYCURV_SYSTEM_PYTHON=1` uses it
# instead of creating .venv. PYTEST_ARGS goes to `make test`'s pytest (e.g. "-n 8" where pytest-xdist is installed),
# BENCH_ARGS to bench/run.py (e.g. "--passes 3").

PYTHON      ?= python3
MAX_JOBS    ?= 2
TORCH_CPU   := torch==2.13.0
TORCH_CUDA  := torch==2.14.1
TRITON      := triton==3.6.0
DEV_DEPS    := "numpy<2.4" pytest pytest-benchmark ninja setuptools wheel scikit-learn matplotlib

ifeq ($(PYCURV_SYSTEM_PYTHON),1)
PY      := $(PYTHON)
VENV_OK :=
else
PY      := .venv/bin/python
VENV_OK := .venv/.ok
endif

.PHONY: build test bench convergence cuda-check info clean

.venv/.ok:
	$(PYTHON) -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	.venv/bin/python -m pip install -q $(TORCH_CPU) $(TRITON) $(DEV_DEPS)
	touch $@

build: $(VENV_OK)
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m pycurv.info

test: build
	$(PY) -m pytest -q -rs tests $(PYTEST_ARGS)

bench: build
	$(PY) bench/run.py $(BENCH_ARGS)

# On scikit-learn's digits: K-FAC, then EF / SF / iEF, then FOP and HD, each against SGD and Adam (CONVERGENCE_ARGS
# is passed to all three, e.g. --quick for a smoke run or --threads 1).
convergence: build
	$(PY) bench/convergence_kfac.py $(CONVERGENCE_ARGS)
	$(PY) bench/convergence_ief.py $(CONVERGENCE_ARGS)
	$(PY) bench/convergence_fop.py $(CONVERGENCE_ARGS)

info: build

# Builds the full extension with CUDA kernels against the CUDA torch wheel (no GPU needed), in a copy of the
# tree so the CPU build of .venv is left alone, then checks that every CUDA kernel is registered.
# nvcc may be a wrapper script: ask it where its toolkit lives.
CUDA_HOME_DIR ?= $(shell d=$$(nvcc -v --dryrun -x cu /dev/null 2>&1 | sed -n 's/^\#\$$ TOP=//p') && test -n "$$d" && readlink -f "$$d")
CUDA_BUILD    := build/cuda-check

.venv-cuda/.ok:
	$(PYTHON) -m venv .venv-cuda
	.venv-cuda/bin/python -m pip install -q --upgrade pip
	.venv-cuda/bin/python -m pip install -q $(TORCH_CUDA) numpy ninja setuptools wheel
	touch $@

cuda-check: .venv-cuda/.ok
	@test -n "$(CUDA_HOME_DIR)" || { echo "cuda-check: nvcc not found on PATH"; exit 1; }
	rm -rf $(CUDA_BUILD) && mkdir -p $(CUDA_BUILD)
	git ls-files -co --exclude-standard | grep -v '^build/' | tar -cf - -T - | tar -xf - -C $(CUDA_BUILD)
	cd $(CUDA_BUILD) && \
	  CUDA_HOME=$(CUDA_HOME_DIR) \
	  CPATH=$$(../../.venv-cuda/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13/include \
	  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(MAX_JOBS) \
	  ../../.venv-cuda/bin/python -m pip install -q --no-build-isolation --no-deps .
	cd /tmp && $(CURDIR)/.venv-cuda/bin/python $(CURDIR)/tests/cuda_check.py

clean:
	rm -rf build dist *.egg-info pycurv/_C*.so pycurv/_build_config.py
