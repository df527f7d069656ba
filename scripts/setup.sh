# Sourced by test.sh and demo.sh: install what a fresh Debian machine lacks
# (scripts/apt-packages.txt, rustup targets) and set the cache directories.
export AIRLOCK_CACHE="${AIRLOCK_CACHE:-$HOME/.cache/airlock}"
mkdir -p "$AIRLOCK_CACHE"
# Share the cargo target directory between clones (CI runs in a fresh clone).
# Cargo tells stale from fresh by mtimes: a fresh clone's files are newer
# than any artifact, so it always rebuilds what changed. A working tree
# edited before another clone built into this directory is not: its edits
# look older than that build (touch the edited files, or give the working
# tree a CARGO_TARGET_DIR of its own).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$AIRLOCK_CACHE/target}"

# Each step says how long the one before it took and the time so far, so a
# slow CI run shows where its minutes went.
AIRLOCK_T0=${AIRLOCK_T0:-$SECONDS}
_step_start=$SECONDS
_step_name=""
step() {
  local now=$SECONDS
  if [ -n "$_step_name" ]; then
    printf '==> (%s: %dm%02ds)\n' "$_step_name" $(((now - _step_start) / 60)) $(((now - _step_start) % 60)) >&2
  fi
  printf '\n==> [%dm%02ds] %s\n' $(((now - AIRLOCK_T0) / 60)) $(((now - AIRLOCK_T0) % 60)) "$*" >&2
  _step_start=$now
  _step_name=$1
}

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

step "rust targets"
rustup target add wasm32-wasip2 x86_64-unknown-linux-musl >/dev/null

source scripts/model.sh
