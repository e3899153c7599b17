# dream-ood: every target runs tools/bootstrap first, because torch-sys cannot even `cargo check` without
# libtorch in .deps/ (see README "Building").
SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3

.PHONY: all bootstrap data demo doctor test lint build build-gpu fixtures-venv clean-deps bench bench-deploy bench-eval

all: build

bootstrap:
	@$(PYTHON) tools/bootstrap

## `make data`: the demo's images (Fashion-MNIST, MNIST, fonts, textures, photos) into .deps/data/, pinned.
data:
	@$(PYTHON) tools/bootstrap --data

build: bootstrap
	$(CARGO) build --release

## `make demo`: the whole method on the embedded default (configs/demo.toml: Fashion-MNIST as ID, four OOD sets,
## the small SD in onnx/demo-sd, CPU): data, build, then `dream-ood run`. Results in runs/demo/report.md.
demo: build data
	./target/release/dream-ood run configs/demo.toml

## `make doctor`: what this machine can do, with a real smoke run of libtorch and ONNX Runtime.
doctor: build
	./target/release/dream-ood doctor

lint: bootstrap
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

## `make test`: what CI runs (.ci/run).
test: lint
	$(CARGO) test

## GPU build (CUDA machines): full CUDA torch + onnxruntime-gpu in .deps/gpu, cuda and tensorrt features,
## libtorch_cuda linked in (build.rs). Binary: target/gpu/release/dream-ood.
build-gpu:
	@$(PYTHON) tools/bootstrap --gpu
	LIBTORCH=$(CURDIR)/.deps/gpu/torch \
	ORT_DYLIB_PATH=$(CURDIR)/.deps/gpu/onnxruntime/capi/libonnxruntime.so.1.31.1 \
	CARGO_TARGET_DIR=$(CURDIR)/target/gpu \
	$(CARGO) build --release --features cuda,tensorrt

## Python venv for the fixture makers in tools/ (not needed to build or test).
fixtures-venv:
	$(PYTHON) -m venv .deps/venv
	.deps/venv/bin/pip install -q -r tools/requirements-fixtures.txt

clean-deps:
	rm -rf .deps

## `make bench`: stage 1, 2 and 3 throughput against the Python references, evaluation against PyTorch / numpy,
## then `score` against a Pillow + PyTorch scorer and `serve` under loopback load (needs `make fixtures-venv`);
## results go in BENCHMARKS.md by hand, with the command and the machine.
bench: build bench-eval
	.deps/venv/bin/python tools/bench_generate.py
	.deps/venv/bin/python tools/bench_stages12.py
	.deps/venv/bin/python tools/bench_deploy.py

## `make bench-deploy`: only the `score` / `serve` part (a few minutes).
bench-deploy: build
	.deps/venv/bin/python tools/bench_deploy.py

## `make bench-eval`: evaluation (collect pass, KNN / Mahalanobis / ViM) against PyTorch / numpy reference code.
bench-eval: build
	$(CARGO) build --release --examples
	.deps/venv/bin/python tools/bench_eval.py
