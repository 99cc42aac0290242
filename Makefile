# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fewstep-installed

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, from the pinned CPU build, and only when none is importable (a CUDA machine keeps its own)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	# two workers, one per core (each test runs one intra-op thread); a module's tests share one worker
	# and so its fixtures
	$(BIN)/python -m pytest -q -n 2 --dist loadscope

demo: $(STAMP)
	# one intra-op thread: the embedded models are tiny and a second thread only adds contention
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/fewstep demo

bench: $(STAMP)
	$(BIN)/python benchmarks/teacher_nfe.py

clean:
	rm -rf $(VENV) runs
