# The two commands of the README: `make demo` (set up, then the main job on the embedded data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; set TORCH= (empty) to keep the torch already in the environment, or e.g.
# TORCH="torch==2.5.1" for another build on a GPU machine.
TORCH ?= torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: setup demo test bench bench-cluster study clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/ddcnn compare --dataset mnist5k --grids 2x2 --out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/run.py

# Time to accuracy on an emulated cluster of network namespaces with shaped links, and the scaling model checked
# against it (benchmarks/cluster.py; docs/scaling.md): needs root and iproute2; about 40 minutes on 2 idle cores,
# resumable (runs/bench-cluster/). QUICK=1: a smoke test of a few minutes.
bench-cluster: setup
	$(BIN)/python benchmarks/cluster.py $(if $(QUICK),--quick)

# The study of docs/results.md: one `ddcnn compare` per table (study/*.yaml), each resumable, then the report
# (study/report.py); about three hours on 2 idle CPU cores for tables 1-6, and about two more for cifar10_full and
# cifar10_full_coarse (all 45,000 CIFAR-10 images; `make study STUDY=cifar10_full` runs one alone). Results go to
# runs/study/<table>/. Table 5 at 64^3 (about four hours) is a flag away: see study/adrenalmnist3d_balanced.yaml.
STUDY ?= cifar10_vgg9 cifar10_vgg9_overlap adrenalmnist3d adrenalmnist3d_balanced tf_flowers tf_flowers_crossfit cifar10_resnet20 tf_flowers_densenet121 cifar10_full cifar10_full_coarse
study: setup
	set -e; for table in $(STUDY); do $(BIN)/ddcnn compare --config study/$$table.yaml --no-progress; done
	$(BIN)/python study/report.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
