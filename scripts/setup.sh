# Sourced by test.sh and demo.sh: install what a fresh Debian machine lacks
# (scripts/apt-packages.txt, rustup targets) and set the cache directories.
export AIRLOCK_CACHE="${AIRLOCK_CACHE:-$HOME/.cache/airlock}"
mkdir -p "$AIRLOCK_CACHE"
# Share the cargo target directory between clones (CI runs in a fresh clone).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$AIRLOCK_CACHE/target}"

step() { printf '\n==> %s\n' "$*" >&2; }

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
