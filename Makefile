# make demo: set up .venv, fetch MNIST, run the demo sweep on a local Ray, print the report.
# make test: set up, then ruff, mypy and every test (slow ones included).
# make repro: the committed reproduction (docs/reproduction.md), with the two-layer k=50 VAE and IWAE (seeds 0, 1) and AIS/BDMC on 100/50 images
# per Table 1 run (AIS again at half the temperatures on 20, the convergence check): some 3 hours on 2 cores, resumable.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
DATA   ?= data
export RAY_USAGE_STATS_ENABLED = 0


.PHONY: setup data demo test lint bench repro gpu-window gpu-ais clean

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
	$(BIN)/iwae-pipeline sweep paper_table1 $(CUT) --where dataset=mnist --where layers=2 --where k=50 --results $(REPRO) --data-dir $(DATA)
	$(BIN)/iwae-pipeline evaluate paper_table1 $(CUT) --where dataset=mnist --method ais --ais-images 100 --ais-steps 500 --results $(REPRO) --data-dir $(DATA)
	$(BIN)/iwae-pipeline evaluate paper_table1 $(CUT) --where dataset=mnist --method ais --ais-images 20 --ais-steps 250 --results $(REPRO) --data-dir $(DATA)
	$(BIN)/iwae-pipeline evaluate paper_table1 $(CUT) --where dataset=mnist --method bdmc --bdmc-images 50 --ais-steps 500 --results $(REPRO) --data-dir $(DATA)
	$(BIN)/iwae-pipeline sweep paper_table2 $(CUT) --results $(REPRO) --data-dir $(DATA)
	$(BIN)/iwae-pipeline sweep estimators $(CUT) --where objective=iwae,miwae,piwae --results $(REPRO) --data-dir $(DATA)
	$(BIN)/iwae-pipeline report --results $(REPRO) --out docs/repro

bench: setup data
	$(BIN)/iwae-pipeline bench --data-dir $(DATA)

# the budgeted reproduction on whatever device torch sees (docs/gpu.md): no .venv, no Ray, the system's
# python with torch >= 2.11, pyarrow, pandas, typer, tqdm, matplotlib and data/ present. With $$OUT set
# (a lent GPU machine), the figures, the report and the tables are copied there.
GPU_RESULTS ?= results/gpu-window
SEEDS       ?= --seed 0 --seed 1
gpu-window:
	$(PYTHON) -m pipeline repro --minutes 8 $(SEEDS) --results $(GPU_RESULTS) --data-dir $(DATA)
	@if [ -n "$$OUT" ]; then cp $(GPU_RESULTS)/repro.json $(GPU_RESULTS)/report/report.md "$$OUT"/ && tar czf "$$OUT"/gpu-window-tables.tar.gz -C $(GPU_RESULTS) tables report repro.json && echo "copied to $$OUT"; fi

# AIS and BDMC on whatever device torch sees, in this process (docs/gpu.md): the k=50 pairs of seeds 0
# and 1 and the two-layer pair after 3 stages (13 epochs), k=5000 on 1,000 test images, AIS on 100 of them
# (T=500, a T/2 check on 20), BDMC on 50 simulated per run. --stages fixes the cut, so the budget
# (--minutes under 5) only picks the quick form of the packing bench.
GPU_AIS_RESULTS ?= results/gpu-ais
gpu-ais:
	$(PYTHON) -m pipeline repro --minutes 4 --stages 3 $(SEEDS) --two-layer --test-images 1000 --train-images 500 --ais-images 100 --bdmc-images 50 --results $(GPU_AIS_RESULTS) --data-dir $(DATA)
	@if [ -n "$$OUT" ]; then cp $(GPU_AIS_RESULTS)/repro.json $(GPU_AIS_RESULTS)/report/report.md "$$OUT"/ && tar czf "$$OUT"/gpu-ais-tables.tar.gz -C $(GPU_AIS_RESULTS) tables report repro.json && echo "copied to $$OUT"; fi

clean:
	rm -rf results .pytest_cache .mypy_cache .ruff_cache
