# Two-command quick start: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean sd-scripts-check

$(PY):
	$(PYTHON) -m venv $(VENV)

# constraints.txt pins the tested torch: on a machine without a GPU it is the CPU build (no CUDA packages).
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) train_network_hina.py

test: $(STAMP)
	$(PY) -m pytest -q

# The full benchmark suite behind docs/BENCHMARKS.md (about an hour on 2 CPU cores; run it on an idle machine).
bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[bench]"
	OMP_NUM_THREADS=2 $(PY) benchmarks/step_speed.py --model all --steps 20 --threads 2 \
		--json docs/step_speed.json --markdown docs/step_speed.md --plot docs/step_speed.png
	$(PY) benchmarks/convergence.py
	$(PY) benchmarks/report.py

# sd-scripts' real train_network.py with our optimizers and networks, every case (docs/SD_SCRIPTS.md; tens of
# minutes on 2 cores; builds its own venv). Needs SD_SCRIPTS_PATH=<an sd-scripts checkout>.
sd-scripts-check: $(STAMP)
	$(PY) benchmarks/sd_scripts_check.py --json docs/sd_scripts_check.json

clean:
	rm -rf $(VENV) output
