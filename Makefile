# `make install` sets up .venv; `make demo` runs the main job on embedded defaults; `make test` runs the suite.
PYTHON ?= python3
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench browser clean

install: $(STAMP)

# Re-install only when pyproject.toml changes, so a second `make install` is instant.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	$(PY) -m bertray.demo

# Chromium drives the web-page test; installed from Debian's packages when missing (root only).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser test will be skipped"; }

# Two xdist workers, one test file each at a time, in collection order (--no-loadscope-reorder; xdist would
# otherwise start the files with the most tests first): the three-node cluster's file comes first, so its
# nodes start while the machine is least loaded, and the long integration files start before the short unit ones.
test: install browser
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

# The CPU benchmarks that fit in about 20 minutes on 2 cores; each writes its Markdown table to outputs/bench/.
# The rest (quality, sweeps, pretraining studies, bench/gpu.sh) take longer or need a GPU: see BENCHMARKS.md.
BENCH_OUT := outputs/bench
bench: install
	mkdir -p $(BENCH_OUT)
	set -o pipefail; $(PY) bench/feed.py --cpus 2 --json $(BENCH_OUT)/feed.json | tee $(BENCH_OUT)/feed.md
	set -o pipefail; $(PY) bench/serve_load.py --out $(BENCH_OUT)/serve_load.json | tee $(BENCH_OUT)/serve_load.md
	set -o pipefail; $(PY) bench/finetune_memory.py --rows 20000 100000 --json $(BENCH_OUT)/finetune_memory.json | tee $(BENCH_OUT)/finetune_memory.md

clean:
	rm -rf runs outputs test-artifacts .pytest_cache
