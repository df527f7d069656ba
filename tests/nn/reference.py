#!/usr/bin/env python3
"""An independent reference for Airlock's inference engine (issue 16).

A BERT forward pass written here in NumPy, from the same safetensors
weights, mean-pooled over the real tokens and L2-normalised (all-MiniLM-L6-v2's
sentence embedding), against either

* ``engine CMD...``: the engine alone (CMD gets the token ids this script's
  tokenizer made on stdin and answers the last hidden states), or
* ``tool AIRLOCK EMBED_WASM``: the ``embed`` example end to end — its own
  tokenizer (compiled to Wasm), the engine through wasi:nn, its pooling —
  run by ``airlock run --isolation process`` with the model granted.

Every sentence's two embeddings must have cosine similarity >= 0.999.

usage: reference.py MODEL_DIR engine CMD...
       reference.py MODEL_DIR tool AIRLOCK EMBED_WASM
"""

import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

SENTENCES = [
    "A sandbox runs untrusted code.",
    "The cat sat on the mat.",
    "Firecracker boots microVMs in about a hundred milliseconds.",
    "WebAssembly components talk through WIT interfaces.",
    "How do I reset my password?",
    "The quarterly report is due on Friday.",
    "Paris is the capital of France.",
    "She plays the violin beautifully.",
    "Kernel-based virtual machines share the host kernel's scheduler.",
    "I would like a cup of coffee, please.",
    "Rust's borrow checker prevents data races at compile time.",
    "It rained all day in Seattle.",
    "An embedding maps text to a vector of numbers.",
    "The quick brown fox jumps over the lazy dog.",
    "Security teams audit capability policies.",
    "Tokyo has the largest metropolitan population in the world.",
    "Photosynthesis converts light into chemical energy.",
    "Please don't share your API keys!",
    "Café, naïve, résumé: accents are stripped by the uncased tokenizer.",
    "1234 5678 — numbers and dashes; (brackets) and [more].",
    "Short.",
    "What is the meaning of life, the universe and everything?",
    "A model's weights are shared read-only with every virtual machine, "
    "so that no machine keeps a private copy of them in its memory.",
    "Dogs are loyal companions and love to play fetch in the park.",
]


def layer_norm(x, g, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * g + b


def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def forward(w, cfg, ids):
    """Last hidden state [n, hidden] of one unpadded sequence (float64)."""
    n, h = len(ids), cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    d = h // heads
    eps = cfg["layer_norm_eps"]
    g = lambda k: w[k].astype(np.float64)
    x = (
        g("embeddings.word_embeddings.weight")[ids]
        + g("embeddings.position_embeddings.weight")[:n]
        + g("embeddings.token_type_embeddings.weight")[0]
    )
    x = layer_norm(x, g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"), eps)
    lin = lambda x, p: x @ g(p + ".weight").T + g(p + ".bias")
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q = lin(x, p + "attention.self.query").reshape(n, heads, d).transpose(1, 0, 2)
        k = lin(x, p + "attention.self.key").reshape(n, heads, d).transpose(1, 0, 2)
        v = lin(x, p + "attention.self.value").reshape(n, heads, d).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(1, 0, 2).reshape(n, h)
        a = layer_norm(
            lin(ctx, p + "attention.output.dense") + x,
            g(p + "attention.output.LayerNorm.weight"),
            g(p + "attention.output.LayerNorm.bias"),
            eps,
        )
        f = lin(gelu(lin(a, p + "intermediate.dense")), p + "output.dense")
        x = layer_norm(f + a, g(p + "output.LayerNorm.weight"), g(p + "output.LayerNorm.bias"), eps)
    return x


def sentence(hidden):
    v = np.asarray(hidden, dtype=np.float64).mean(0)
    return v / np.linalg.norm(v)


def tool_embeddings(model, airlock, wasm):
    """The embed tool's embeddings of SENTENCES, run by airlock."""
    with tempfile.TemporaryDirectory() as d:
        policy = os.path.join(d, "policy.toml")
        with open(policy, "w") as f:
            f.write(f'version = 1\n[limits]\nmemory = "256MiB"\ntimeout = "120s"\n'
                    f'fuel = 100_000_000_000\n[models]\nminilm = {json.dumps(model)}\n')
        out = subprocess.run(
            [airlock, "run", wasm, "--isolation", "process", "--policy", policy,
             "--tool", "embed", "--args", json.dumps({"texts": SENTENCES})],
            capture_output=True, text=True, check=True,
        ).stdout
    result = json.loads(out)["result"]
    assert "ok" in result and "ok" in result["ok"], f"the tool failed: {result}"
    return result["ok"]["ok"]


def main():
    model, mode, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode == "tool":
        compare_tool(model, *rest)
        return
    assert mode == "engine", __doc__
    cmd = rest
    cfg = json.load(open(f"{model}/config.json"))
    w = load_file(f"{model}/model.safetensors")
    tok = Tokenizer.from_file(f"{model}/tokenizer.json")
    # The file pads every input to 128 tokens; a sentence embedding is the
    # mean over its real tokens (sentence-transformers' max_seq_length 256).
    tok.no_padding()
    tok.enable_truncation(256)
    ids = [tok.encode(s).ids for s in SENTENCES]
    out = subprocess.run(
        cmd, input=json.dumps({"sequences": ids}), capture_output=True, text=True, check=True
    ).stdout
    hidden = json.loads(out)["hidden"]
    assert len(hidden) == len(SENTENCES), f"{len(hidden)} answers for {len(SENTENCES)} sentences"
    worst = 1.0
    for s, seq, got in zip(SENTENCES, ids, hidden):
        want = forward(w, cfg, seq)
        assert len(got) == len(seq), f"{s!r}: {len(got)} rows for {len(seq)} tokens"
        cos = float(sentence(got) @ sentence(want))
        worst = min(worst, cos)
        print(f"cos {cos:.6f}  {len(seq):3d} tokens  {s[:50]!r}")
        assert cos >= 0.999, f"{s!r}: cosine {cos} < 0.999"
    # Different sentences must not collapse to one vector.
    a, b = sentence(hidden[1]), sentence(hidden[13])
    assert float(a @ b) < 0.9, "two unrelated sentences embed alike"
    print(f"reference: {len(SENTENCES)} sentences, worst cosine {worst:.6f} (>= 0.999)")


def compare_tool(model, airlock, wasm):
    cfg = json.load(open(f"{model}/config.json"))
    w = load_file(f"{model}/model.safetensors")
    tok = Tokenizer.from_file(f"{model}/tokenizer.json")
    tok.no_padding()
    tok.no_truncation()
    got = tool_embeddings(model, airlock, wasm)
    assert len(got) == len(SENTENCES), f"{len(got)} embeddings for {len(SENTENCES)} sentences"
    worst = 1.0
    for s, v in zip(SENTENCES, got):
        want = sentence(forward(w, cfg, tok.encode(s).ids))
        v = np.asarray(v, dtype=np.float64)
        assert len(v) == cfg["hidden_size"], f"{s!r}: {len(v)} numbers"
        cos = float(v @ want / np.linalg.norm(v))
        worst = min(worst, cos)
        print(f"cos {cos:.6f}  {s[:50]!r}")
        assert cos >= 0.999, f"{s!r}: cosine {cos} < 0.999"
    print(f"reference (the embed tool): {len(SENTENCES)} sentences, worst cosine {worst:.6f} (>= 0.999)")


if __name__ == "__main__":
    main()
