#!/usr/bin/env bash
# The test command (README "Run the tests"). Installs what a fresh Debian
# machine lacks, builds the example components and runs the whole suite.
# Slow artifacts are cached under ${AIRLOCK_CACHE:-~/.cache/airlock}.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/setup.sh

# --- the cache: stale builds out before new ones go in ---
# (A target directory shared by many commits would otherwise grow by
# gigabytes a day until the disk is full.)
step "pruning stale builds from the cached target directories (cargo xtask prune-cache)"
cargo xtask prune-cache
df -h "$AIRLOCK_CACHE" | tail -1 >&2

# --- example components ---
step "building example components (cargo xtask examples)"
cargo xtask examples

# --- guest image: kernel (cached by config hash), static init, initramfs ---
step "guest image (cargo xtask guest-image; the kernel build takes minutes once, then is cached)"
cargo xtask guest-image

# --- nested-KVM harness: outer QEMU TCG VM with SVM + Debian cloud kernel ---
step "nested-KVM harness (cargo xtask nested)"
cargo xtask nested

# --- the inference engine against an independent NumPy forward pass ---
# Python with the reference's pinned packages, keyed by the requirements.
AIRLOCK_PY="$AIRLOCK_CACHE/py-$(sha256sum tests/nn/requirements.txt | cut -c1-16)"
if [ ! -x "$AIRLOCK_PY/bin/python" ]; then
  step "Python for the NumPy reference (tests/nn/requirements.txt)"
  rm -rf "$AIRLOCK_PY.tmp"
  python3 -m venv "$AIRLOCK_PY.tmp"
  "$AIRLOCK_PY.tmp/bin/pip" install --quiet -r tests/nn/requirements.txt
  mv "$AIRLOCK_PY.tmp" "$AIRLOCK_PY"
fi
step "inference engine vs its NumPy reference (tests/nn/reference.py, all-MiniLM-L6-v2)"
cargo build --release --locked -p airlock-nn --example encode
"$AIRLOCK_PY/bin/python" tests/nn/reference.py "$AIRLOCK_MINILM" engine \
  "$CARGO_TARGET_DIR/release/examples/encode" "$AIRLOCK_MINILM"
# The embed tool end to end (its tokenizer in Wasm, wasi:nn, its pooling).
cargo build --locked -p airlock --bin airlock
"$AIRLOCK_PY/bin/python" tests/nn/reference.py "$AIRLOCK_MINILM" tool \
  "$CARGO_TARGET_DIR/debug/airlock" examples/out/embed.wasm

# --- Kubernetes manifests: the API schemas and airlock's own config check ---
AIRLOCK_PY_DEPLOY="$AIRLOCK_CACHE/py-deploy-$(sha256sum deploy/requirements.txt | cut -c1-16)"
if [ ! -x "$AIRLOCK_PY_DEPLOY/bin/python" ]; then
  step "Python for the manifest check (deploy/requirements.txt)"
  rm -rf "$AIRLOCK_PY_DEPLOY.tmp"
  python3 -m venv "$AIRLOCK_PY_DEPLOY.tmp"
  "$AIRLOCK_PY_DEPLOY.tmp/bin/pip" install --quiet -r deploy/requirements.txt
  mv "$AIRLOCK_PY_DEPLOY.tmp" "$AIRLOCK_PY_DEPLOY"
fi
step "Kubernetes manifests (deploy/check.py: kubernetes-validate strict, cross-checks, airlock serve --check)"
"$AIRLOCK_PY_DEPLOY/bin/python" deploy/check.py "$CARGO_TARGET_DIR/debug/airlock"

# --- the suite ---
# --no-fail-fast: one failing test binary must not hide the results of the
# others (the nested VM tests and the service tests come late).
step "unit and integration tests"
cargo test --workspace --locked --no-fail-fast

# --- load: a burst of 1,000 invocations through the service, no errors ---
step "load: 1,000 invocations at once (cargo xtask bench load)"
cargo xtask bench load --concurrency 1000

# --- fuzzing: a smoke run of every target (docs/fuzzing.md) ---
step "fuzz: every target for 30 s (cargo xtask fuzz; nightly, built once, cached)"
cargo xtask fuzz --seconds 30 --quick-build

step "all tests passed"
