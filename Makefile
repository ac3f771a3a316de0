# Everything a new user or CI needs: `make demo` and `make test` install what they use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch: an unpinned torch would pull several GB of CUDA packages on Linux.
# Elsewhere, `make TORCH=torch` (or any spec pip understands) takes your platform's build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed-$(shell echo '$(TORCH)' | tr -c 'a-zA-Z0-9.=\n' _)
DEMO   ?= demo

.PHONY: setup demo test lint fuzz bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

demo: setup
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	@echo "== a small upcycled MoE (Mixtral layout, transformers' save_pretrained) and its dense source"
	$(BIN)/python -m fixtures.upcycled $(DEMO) --layers 4 --experts 8 --hidden 256 \
		--intermediate 512 --vocab 1024 --max-shard-size 10MB
	$(BIN)/ders inspect $(DEMO)/model
	$(BIN)/ders compress $(DEMO)/model --drop 0.9
	$(BIN)/ders quantize $(DEMO)/model --bits 2 -o $(DEMO)/q2.ders
	$(BIN)/ders compress $(DEMO)/model --lossless -o $(DEMO)/exact.ders
	$(BIN)/ders verify $(DEMO)/model.ders --against $(DEMO)/model
	$(BIN)/ders expand $(DEMO)/model.ders -o $(DEMO)/restored
	$(BIN)/python -m fixtures.compare_logits $(DEMO)/model $(DEMO)/restored
	$(BIN)/ders compress $(DEMO)/model --drop 0.9 -o $(DEMO)/model-ders/ --quiet
	$(BIN)/python -m fixtures.compare_logits $(DEMO)/model $(DEMO)/model-ders
	@echo "== sizes"
	@du -sh $(DEMO)/model $(DEMO)/model.ders $(DEMO)/q2.ders $(DEMO)/exact.ders $(DEMO)/restored \
		$(DEMO)/model-ders

test: setup lint
	$(BIN)/python -m pytest -q

# The fuzzer of tests/test_fuzz.py, longer: ten times the cases of make test, fresh random ones
# each run, and every byte of every seed archive flipped in turn (about an hour on 2 cores).
fuzz: setup
	DERS_FUZZ_SCALE=10 DERS_FUZZ_RANDOM=1 DERS_FUZZ_EXHAUSTIVE=1 \
		$(BIN)/python -m pytest tests/test_fuzz.py -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check ders_cli tests fixtures bench

bench: setup
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache .hypothesis
