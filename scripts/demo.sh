#!/usr/bin/env bash
# The demo (README "Run the demo"): build, inspect an example tool, check its
# policy, and call it.
set -euo pipefail
cd "$(dirname "$0")/.."
export AIRLOCK_CACHE="${AIRLOCK_CACHE:-$HOME/.cache/airlock}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$AIRLOCK_CACHE/target}"
mkdir -p "$AIRLOCK_CACHE"
rustup target add wasm32-wasip2 >/dev/null
cargo xtask examples
cargo build --release -p airlock
AIRLOCK="$CARGO_TARGET_DIR/release/airlock"
EX=examples/out
say() { printf '\n\033[1m# %s\033[0m\n' "$*"; }

work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
mkdir -p "$work/notes"
printf 'buy milk\ncall the plumber\nmilk the cows\n' > "$work/notes/todo.txt"
cat > "$work/policy.toml" <<TOML
version = 1
[limits]
memory = "32 MiB"
timeout = "5s"
[[filesystem]]
host = "notes"
guest = "/notes"
mode = "ro"
TOML

say "What does the files tool offer, and what does it ask for?"
"$AIRLOCK" inspect "$EX/files.wasm"
say "Does the policy fit the component?"
"$AIRLOCK" policy check "$work/policy.toml" --component "$EX/files.wasm"

isolation=process
say "Note: the vsock device that carries calls into the microVM is not built yet, so tool calls below run in the Wasm wall in-process (--isolation process)."

say "Call files_search in the sandbox"
"$AIRLOCK" run "$EX/files.wasm" --policy "$work/policy.toml" --tool files_search \
  --args '{"dir": "/notes", "needle": "milk"}' --isolation "$isolation"
say "The same tool may not write: the read-only grant is enforced and audited"
"$AIRLOCK" run "$EX/files.wasm" --policy "$work/policy.toml" --tool files_write \
  --args '{"path": "/notes/todo.txt", "content": "pwned"}' --isolation "$isolation" || true
say "An adversarial tool trying to loop forever is stopped"
"$AIRLOCK" run "$EX/escape.wasm" --policy "$work/policy.toml" --tool spin --isolation "$isolation" || true

say "The microVM wall: Airlock's VMM boots the guest, whose PID 1 runs example tools in wasmtime"
image="$(cargo xtask guest-image | tail -1)"
vmlinux="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["vmlinux"])' "$image")"
initrd="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["initramfs_selftest"])' "$image")"
if [ -e /sys/module/kvm_pvm ] || [ ! -e /dev/kvm ]; then
  say "This host's /dev/kvm cannot run the guest (PVM or missing): running the microVM inside the nested-KVM harness (QEMU TCG + kvm-amd); this takes a few minutes"
  nested="$(cargo xtask nested | tail -1)"
  outer_kernel="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["outer_kernel"])' "$nested")"
  outer_initrd="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["outer_initramfs"])' "$nested")"
  timeout 1800 qemu-system-x86_64 -accel tcg,thread=multi -cpu EPYC,+svm -smp 2 -m 2048 -nographic -no-reboot \
    -nodefaults -serial stdio -kernel "$outer_kernel" -initrd "$outer_initrd" \
    -append "console=ttyS0 panic=-1 quiet airlock_only=selftest" </dev/null \
    | tr -d '\r' | grep -E 'AIRLOCK-SELFTEST|"exit"|NESTED-RESULT' || true
else
  "$AIRLOCK" vm boot --kernel "$vmlinux" --initrd "$initrd" --cmdline airlock.selftest=1 --timeout-secs 300
fi
