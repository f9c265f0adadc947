# The two commands a user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.legoc-installed
OUT    ?= out

.PHONY: setup demo test bench clean
setup: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Compile the MNIST example for the host CPU and for a Jetson Nano, show the host artifact's
# profiles and draw its accuracy/latency Pareto front, pick variants for a budget, then run the
# host artifact at three sizes and follow a budget that changes over time.
demo: setup
	$(VENV)/bin/legoc compile examples/mnist_resnet.py --target host -o $(OUT)/mnist-host.lego
	$(VENV)/bin/legoc compile examples/mnist_resnet.py --target jetson-nano -o $(OUT)/mnist-jetson-nano.lego
	$(VENV)/bin/legoc inspect $(OUT)/mnist-host.lego --plot $(OUT)/mnist-host-pareto.png
	$(VENV)/bin/legoc select $(OUT)/mnist-host.lego --latency-ms 6
	$(PY) examples/demo_app.py $(OUT)/mnist-host.lego

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/compile_time.py
	$(PY) benchmarks/solver.py
	$(PY) benchmarks/switch.py
	$(PY) benchmarks/estimators.py

clean:
	rm -rf $(OUT) build dist *.egg-info
