//! Build the model's tokenizer into the embed components: `tokenizer.json` of
//! all-MiniLM-L6-v2, from `$AIRLOCK_MINILM` or the cache `scripts/model.sh`
//! fills (`${AIRLOCK_CACHE:-~/.cache/airlock}/models/all-MiniLM-L6-v2`).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=AIRLOCK_MINILM");
    println!("cargo:rerun-if-env-changed=AIRLOCK_CACHE");
    let dir = std::env::var_os("AIRLOCK_MINILM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("AIRLOCK_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/airlock")
                });
            cache.join("models/all-MiniLM-L6-v2")
        });
    let src = dir.join("tokenizer.json");
    println!("cargo:rerun-if-changed={}", src.display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    if let Err(e) = std::fs::copy(&src, out.join("tokenizer.json")) {
        panic!(
            "the embed examples need the model's tokenizer at {}: {e} (scripts/setup.sh fetches it; or set AIRLOCK_MINILM)",
            src.display()
        );
    }
}
