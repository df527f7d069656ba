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
if [ -e /sys/module/kvm_pvm ] || [ ! -e /dev/kvm ]; then
  say "Note: /dev/kvm here cannot run the microVM guest (PVM or missing)."
fi
say "Note: the microVM wall (--isolation vm) is not built yet; this demo runs the Wasm wall in-process (--isolation process)."

say "Call files_search in the sandbox"
"$AIRLOCK" run "$EX/files.wasm" --policy "$work/policy.toml" --tool files_search \
  --args '{"dir": "/notes", "needle": "milk"}' --isolation "$isolation"
say "The same tool may not write: the read-only grant is enforced and audited"
"$AIRLOCK" run "$EX/files.wasm" --policy "$work/policy.toml" --tool files_write \
  --args '{"path": "/notes/todo.txt", "content": "pwned"}' --isolation "$isolation" || true
say "An adversarial tool trying to loop forever is stopped"
"$AIRLOCK" run "$EX/escape.wasm" --policy "$work/policy.toml" --tool spin --isolation "$isolation" || true
