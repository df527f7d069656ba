#!/usr/bin/env bash
# The demo (README "Run the demo"): build, inspect an example tool, check its
# policy, and call it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo xtask examples
cargo build --release -p airlock -p airlock-vmm -p agent-loop
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

if [ -e /sys/module/kvm_pvm ] || [ ! -e /dev/kvm ]; then
  isolation=process
  say "Note: this host's /dev/kvm cannot run the guest (PVM or missing), so the calls below run in the Wasm wall in-process (--isolation process); the microVM part at the end runs inside the nested-KVM harness."
else
  isolation=vm
fi

say "Call files_search in the sandbox"
"$AIRLOCK" run "$EX/files.wasm" --policy "$work/policy.toml" --tool files_search \
  --args '{"dir": "/notes", "needle": "milk"}' --isolation "$isolation"
say "The same tool may not write: the read-only grant is enforced and audited"
"$AIRLOCK" run "$EX/files.wasm" --policy "$work/policy.toml" --tool files_write \
  --args '{"path": "/notes/todo.txt", "content": "pwned"}' --isolation "$isolation" || true
say "An adversarial tool trying to loop forever is stopped"
"$AIRLOCK" run "$EX/escape.wasm" --policy "$work/policy.toml" --tool spin --isolation "$isolation" || true

say "The service: airlock serve on 127.0.0.1 — upload over HTTP, export as LLM tools, call, audit"
token="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
cat > "$work/serve.toml" <<TOML
[[tokens]]
name = "demo-admin"
token = "$token"
tenant = "demo"
role = "admin"
[tenants.demo]
allowed_host_dirs = ["$work/notes"]
TOML
sed "s|host = \"notes\"|host = \"$work/notes\"|" "$work/policy.toml" > "$work/policy-abs.toml"
"$AIRLOCK" serve --config "$work/serve.toml" --data-dir "$work/data" --listen 127.0.0.1:0 > "$work/serve.out" &
server=$!
# The server may already be stopped when the script ends: that is no failure.
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do grep -q listening "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
url="$(sed -n 's/^airlock: listening on //p' "$work/serve.out")"
auth=(-H "Authorization: Bearer $token")
echo "serving on $url"
curl -sSf "${auth[@]}" -F name=files -F "component=@$EX/files.wasm" -F "policy=<$work/policy-abs.toml" "$url/v1/components"; echo
curl -sSf "${auth[@]}" --data-binary "@$EX/kitchen.wasm" "$url/v1/components?name=kitchen" >/dev/null
say "The tools, in OpenAI's function-calling shape (also format=anthropic and format=mcp; MCP clients use $url/mcp)"
curl -sSf "${auth[@]}" "$url/v1/tools?format=openai" \
  | python3 -c 'import json,sys; [print("  ", t["function"]["name"], "-", t["function"]["description"]) for t in json.load(sys.stdin)["tools"]]'
say "Call files__files_search over HTTP"
curl -sSf "${auth[@]}" -d '{"arguments": {"dir": "/notes", "needle": "milk"}}' "$url/v1/tools/files__files_search:invoke"; echo
say "An agent loop (examples/agent-loop) wiring these tools into a function-calling conversation"
AIRLOCK_TOKEN="$token" "$CARGO_TARGET_DIR/release/agent-loop" --url "$url" --script examples/agent-loop/script.json
say "The audit log: every upload and call, hash-chained"
curl -sSf "${auth[@]}" "$url/v1/audit/verify"; echo
kill "$server"; wait "$server" || true
"$AIRLOCK" audit verify --data-dir "$work/data"
say "Note: the service above ran calls in the Wasm wall in-process (isolation.mode = \"process\"); with [isolation] mode = \"vm\" in its config each call runs in a fresh microVM from a warm pool (docs/service.md; the nested tests run it that way)."

say "The microVM wall: Airlock's VMM boots a microVM, loads the kitchen tool into its wasmtime over vsock, calls it, shuts it down"
image="$(cargo xtask guest-image | tail -1)"
vmlinux="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["vmlinux"])' "$image")"
initrd="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["initramfs_selftest"])' "$image")"
if [ -e /sys/module/kvm_pvm ] || [ ! -e /dev/kvm ]; then
  say "This host's /dev/kvm cannot run the guest (PVM or missing): running the same call inside the nested-KVM harness (QEMU TCG + kvm-amd, where /airlock run --isolation vm boots our VMM); this takes a few minutes"
  nested="$(cargo xtask nested | tail -1)"
  # The outer VM's QEMU command line comes from the manifest (the tests use the same).
  mapfile -t outer_qemu < <(python3 -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))["qemu"]))' "$nested")
  outer_append="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["append"])' "$nested")"
  say "Then a state volume in VM isolation: the service's notes tool writes to its tenant's volume from two fresh microVMs, and a third lists both notes"
  out="$(timeout 2400 "${outer_qemu[@]}" -append "$outer_append airlock_only=vm-invoke,service-vm-state" </dev/null | tr -d "\r" || true)"
  sed -n "/NESTED-RESULT-BEGIN/,/NESTED-RESULT-END/p" <<<"$out"
  for s in vm-invoke service-vm-state; do
    if ! grep -q "NESTED-RESULT-END $s 0" <<<"$out"; then
      echo "demo: $s in the microVM failed; the outer VM printed:" >&2
      tail -n 40 <<<"$out" >&2
      exit 1
    fi
  done
else
  "$AIRLOCK" run "$EX/kitchen.wasm" --tool recipes_summarize --args '{"values": [12, 30, 45, 8]}' --isolation vm
  say "A state volume in VM isolation: the service's notes tool writes to its tenant's volume from two fresh microVMs, and a third lists both notes"
  agent="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["initramfs"])' "$image")"
  cat > "$work/serve-vm.toml" <<TOML
[isolation]
mode = "vm"
kernel = "$vmlinux"
initrd = "$agent"
warm = 0
[[volumes]]
name = "notes"
quota = "1 MiB"
[[tokens]]
name = "demo-admin"
token = "$token"
tenant = "demo"
role = "admin"
TOML
  "$AIRLOCK" serve --config "$work/serve-vm.toml" --data-dir "$work/data-vm" --listen 127.0.0.1:0 > "$work/serve-vm.out" &
  server=$!
  for _ in $(seq 100); do grep -q listening "$work/serve-vm.out" 2>/dev/null && break; sleep 0.1; done
  url="$(sed -n 's/^airlock: listening on //p' "$work/serve-vm.out")"
  printf 'version = 1\n[[filesystem]]\nvolume = "notes"\nguest = "/state"\nmode = "rw"\n' > "$work/notes.toml"
  curl -sSf "${auth[@]}" -F name=notes -F "component=@$EX/notes.wasm" -F "policy=<$work/notes.toml" "$url/v1/components"; echo
  for n in first second; do
    curl -sSf "${auth[@]}" -d "{\"arguments\": {\"text\": \"written in the $n microVM\"}}" "$url/v1/tools/notes__notes_add:invoke" \
      | python3 -c 'import json,sys; r=json.load(sys.stdin); print("  add:", r["result"], "isolation:", r["isolation"])'
  done
  curl -sSf "${auth[@]}" -d '{"arguments": {}}' "$url/v1/tools/notes__notes_list:invoke" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print("  list:", r["result"])'
  kill "$server"; wait "$server" || true
fi
