# The two commands of the README contract:
#   make run   - set up .venv if missing, then run the main job on the embedded default
#   make test  - set up .venv if missing, then run the test suite
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-arm setup clean

setup: $(STAMP)

# torch==2.13.0 is installed first and on its own: pip resolves it to the CPU wheel on local disk.
# --no-build-isolation: an isolated build env would pull the newest (CUDA) torch from the registry.
# The editable install also compiles the native kernels mobilemoe._C (setup.py), so it re-runs when they change.
$(STAMP): pyproject.toml setup.py scripts/install_llama_cpp.sh $(wildcard src/mobilemoe/kernels/csrc/*)
	# bubblewrap is the HumanEval sandbox's OS boundary (eval refuses HumanEval without it).
	command -v bwrap >/dev/null || (apt-get update -qq && apt-get install -y -qq bubblewrap) \
		|| echo "warning: bubblewrap not installed; eval will refuse HumanEval (apt-get install bubblewrap)"
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet "torch==2.13.0"
	$(VPY) -m pip install --quiet "setuptools>=70" wheel ninja
	$(VPY) -m pip install --quiet --no-build-isolation -e '.[dev]'
	# ExecuTorch + torchao without their dependency pins (they would replace torch 2.13.0).
	$(VPY) -m pip install --quiet --no-deps "executorch==1.5.1" "torchao==0.18.0"
	# llama.cpp for the GGUF parity tests, built from source without its AMX path (see the script).
	scripts/install_llama_cpp.sh $(VPY)
	$(VPY) -m pip install --quiet "gguf==0.19.0"
	$(VPY) -c "import torch; assert '+cpu' in torch.__version__ or not torch.cuda.is_available(), torch.__version__"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mobilemoe demo

test: $(STAMP)
	$(VPY) -m pytest

# The aarch64 kernel units under qemu-aarch64 (apt-get install g++-aarch64-linux-gnu qemu-user);
# `make test` runs the same check through tests/kernels/test_arm_qemu.py and skips it without the tools.
test-arm:
	scripts/test_arm.sh

clean:
	rm -rf $(VENV) build src/*.egg-info
