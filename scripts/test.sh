#!/usr/bin/env bash
# The test command (README "Run the tests"). Installs what a fresh Debian
# machine lacks, builds the example components and runs the whole suite.
# Slow artifacts are cached under ${AIRLOCK_CACHE:-~/.cache/airlock}.
set -euo pipefail
cd "$(dirname "$0")/.."

export AIRLOCK_CACHE="${AIRLOCK_CACHE:-$HOME/.cache/airlock}"
mkdir -p "$AIRLOCK_CACHE"
# Share the cargo target directory between clones (CI runs in a fresh clone).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$AIRLOCK_CACHE/target}"

step() { printf '\n==> %s\n' "$*" >&2; }

# --- system packages (Debian) ---
need_pkgs=()
for pkg in $(cat scripts/apt-packages.txt); do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_pkgs+=("$pkg")
done
if ((${#need_pkgs[@]})); then
  step "installing Debian packages: ${need_pkgs[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}"
fi

# --- Rust targets ---
step "rust targets"
rustup target add wasm32-wasip2 x86_64-unknown-linux-musl >/dev/null

# --- example components ---
step "building example components (cargo xtask examples)"
cargo xtask examples

# --- guest image: kernel (cached by config hash), static init, initramfs ---
step "guest image (cargo xtask guest-image; the kernel build takes minutes once, then is cached)"
cargo xtask guest-image

# --- nested-KVM harness: outer QEMU TCG VM with SVM + Debian cloud kernel ---
step "nested-KVM harness (cargo xtask nested)"
cargo xtask nested

# --- the suite ---
step "unit and integration tests"
cargo test --workspace --locked

step "all tests passed"
