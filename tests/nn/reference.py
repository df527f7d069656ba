#!/usr/bin/env python3
"""An independent reference for Airlock's inference engine (issue 16).

A BERT forward pass written here in NumPy, from the same safetensors
weights, against the engine (``ENGINE_CMD``, given the token ids on stdin,
answering the last hidden states). Both are mean-pooled over the real tokens
and L2-normalised (all-MiniLM-L6-v2's sentence embedding); every sentence's
two embeddings must have cosine similarity >= 0.999.

usage: reference.py MODEL_DIR ENGINE_CMD...
"""

import json
import math
import subprocess
import sys

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


def main():
    model, cmd = sys.argv[1], sys.argv[2:]
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


if __name__ == "__main__":
    main()
