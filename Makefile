# Every target creates the virtual environment on first use, so a fresh clone needs only
# Python 3.11, pip and a C compiler.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Compiled Warp kernels are kept between runs (cold compile: seconds) in diffworld's one kernel
# cache, the same as for `diffworld` run by hand: ~/.cache/diffworld/warp, or $WARP_CACHE_PATH.
export MPLBACKEND ?= Agg
export PYVISTA_OFF_SCREEN ?= true

.PHONY: all demo test test-slow bench clean venv

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: the plain requirement would otherwise fetch a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diffworld optimize scenes/reconstruct_genus2.yaml --out runs/demo --overwrite

test: $(STAMP)
	# -n auto: one worker per core (pytest-xdist); Warp builds each kernel module once into the shared cache.
	$(PY) -m pytest -q -p no:cacheprovider -n auto -m "not slow" tests

test-slow: $(STAMP)
	# the shipped scenes at full size, every iteration (tens of minutes on 2 cores)
	$(PY) -m pytest -q -p no:cacheprovider -n auto -m slow tests

bench: $(STAMP)
	$(PY) benchmarks/marching_cubes.py
	# The MPM baseline is Taichi (FluidLab's formulation); --quick skips the long memory runs.
	$(PY) -m pip install -q 'taichi==1.7.4'
	$(PY) benchmarks/mpm.py --quick
	# FlexiCubes vs the public nv-tlabs implementation when DIFFWORLD_FLEXICUBES_REF names a folder
	# holding its flexicubes.py and tables.py (not shipped here), else vs our marching cubes.
	$(PY) benchmarks/flexicubes.py
	$(PY) benchmarks/gshell.py
	$(PY) benchmarks/isosurface_quality.py
	$(PY) benchmarks/flexicubes_tets.py

clean:
	rm -rf build runs .cache .pytest_cache
