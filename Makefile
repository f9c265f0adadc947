# The two commands a user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.legoc-installed
OUT    ?= out

.PHONY: setup emulation demo test cross bench clean
setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-build-isolation -e ".[compile,runtime]"
	touch $(STAMP)

# The aarch64 stand-in board: qemu-user (apt-get, when missing) + an aarch64 Python with the TVM
# runtime wheels, cached in ~/.cache/legoc/emulation (idempotent; a few seconds once cached).
emulation: setup
	$(PY) -m legoc.targets.emulation setup

# Compile the MNIST example for the host CPU and for a Jetson Nano, measure the host artifact's
# test-split accuracy (never seen by compile), show its profiles and draw its accuracy/latency Pareto front, pick variants for a budget, then run the
# host artifact at three sizes and follow a budget that changes over time.
demo: setup
	$(VENV)/bin/legoc compile examples/mnist_resnet.py --target host -o $(OUT)/mnist-host.lego
	$(VENV)/bin/legoc compile examples/mnist_resnet.py --target jetson-nano -o $(OUT)/mnist-jetson-nano.lego
	$(VENV)/bin/legoc evaluate $(OUT)/mnist-host.lego examples/mnist_resnet.py --uniform --record
	$(VENV)/bin/legoc inspect $(OUT)/mnist-host.lego --plot $(OUT)/mnist-host-pareto.png
	$(VENV)/bin/legoc select $(OUT)/mnist-host.lego --latency-ms 0.9
	$(PY) examples/demo_app.py $(OUT)/mnist-host.lego

test: setup emulation
	# iproute2 (ip, tc) for the shaped-link test (tests/test_cluster_plan.py), when missing and root
	@command -v ip >/dev/null && command -v tc >/dev/null || { [ "$$(id -u)" = 0 ] && \
		(apt-get install -y -q iproute2 >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q iproute2 >/dev/null)); } || true
	$(PY) -m pytest -q tests

# Compile the MNIST example for every target in the table and verify the Jetson GPU code
# (scripts/cross_compile.sh: the CI cross-compilation recipe, docs/targets.md).
cross: setup
	scripts/cross_compile.sh examples/mnist_resnet.py $(OUT)/cross

bench: setup
	$(PY) benchmarks/compile_time.py
	$(PY) benchmarks/solver.py
	$(PY) benchmarks/switch.py
	$(PY) benchmarks/estimators.py

clean:
	rm -rf $(OUT) build dist *.egg-info
