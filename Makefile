# make demo: set up .venv, fetch MNIST, run the demo sweep on a local Ray, print the report.
# make test: set up, then ruff, mypy and every test (slow ones included).
# make repro: the committed reproduction (docs/reproduction.md): about 2 hours on 2 cores, resumable.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
DATA   ?= data
export RAY_USAGE_STATS_ENABLED = 0


.PHONY: setup data demo test lint bench repro clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "error: Python >= 3.10 is needed (set PYTHON=...)"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev,bench]"
	rm -f $(VENV)/.installed-* && touch $@

# always asks: the fetch is a quick check when the cache is current, and rebuilds a stale one (pixels /256)
data: setup
	$(BIN)/iwae-pipeline data fetch mnist --data-dir $(DATA)

demo: setup data
	$(BIN)/iwae-pipeline sweep demo --results results/demo --data-dir $(DATA)

lint: setup
	$(BIN)/ruff check iwae pipeline jobs tests
	$(BIN)/ruff format --check iwae pipeline jobs tests
	$(BIN)/mypy iwae pipeline

test: setup data lint
	IWAE_DATA_DIR=$(abspath $(DATA)) $(BIN)/python -m pytest -q -p no:cacheprovider tests

REPRO ?= results/repro
CUT   ?= --stages 2
repro: setup data
	$(BIN)/iwae-pipeline sweep paper_table1 $(CUT) --where dataset=mnist --where layers=1 --results $(REPRO) --data-dir $(DATA)
	$(BIN)/iwae-pipeline sweep paper_table2 $(CUT) --results $(REPRO) --data-dir $(DATA)
	$(BIN)/iwae-pipeline sweep estimators $(CUT) --where objective=iwae,miwae,piwae --results $(REPRO) --data-dir $(DATA)
	$(BIN)/iwae-pipeline report --results $(REPRO) --out docs/repro

bench: setup data
	$(BIN)/iwae-pipeline bench --data-dir $(DATA)

clean:
	rm -rf results .pytest_cache .mypy_cache .ruff_cache
