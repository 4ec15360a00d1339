"""Small GGUF files for the tests: random blocks of every packed format, and a tiny Llama written as llama.cpp
writes one (``gguf.GGUFWriter``), its layers spread over the formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lora_fast.gguf.formats import QTYPES

# Byte offsets of each format's fp16 scales (rewritten to finite values), and their magnitude: the weights stay O(1).
SCALES = {
    "Q4_0": ((0,), 0.05),
    "Q4_1": ((0, 2), 0.05),
    "Q5_0": ((0,), 0.03),
    "Q8_0": ((0,), 0.005),
    "Q4_K": ((0, 2), 0.002),
    "Q6_K": ((208,), 0.0002),
}


def random_blocks(qtype: str, rows: int, blocks: int, rng: np.random.Generator) -> np.ndarray:
    """``(rows, blocks · type_size)`` uint8: random bits in every field, fp16 scales finite and of either sign."""
    fmt = QTYPES[qtype]
    data = rng.integers(0, 256, size=(rows, blocks, fmt.type_size), dtype=np.uint8)
    offsets, size = SCALES[qtype]
    for at in offsets:
        scale = (rng.standard_normal((rows, blocks)) * size).astype(np.float16)
        data[:, :, at : at + 2] = scale.view(np.uint8).reshape(rows, blocks, 2)
    return data.reshape(rows, blocks * fmt.type_size)


# The tiny Llama's layers and the format of each (one layer of an unpacked quantised format: Q5_1).
LAYER_TYPES = {
    "attn_q": "Q4_0",
    "attn_k": "Q4_1",
    "attn_v": "Q5_0",
    "attn_output": "Q4_K",
    "ffn_gate": "Q6_K",
    "ffn_up": "Q8_0",
    "ffn_down": "Q4_1",
}
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2


def write_tiny_llama(
    path: str | Path,
    vocab_size: int,
    tied: bool = True,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    arch: str = "llama",
) -> Path:
    """A 2-layer Llama (width 256) as a GGUF file: embedding Q8_0 (and the head tied to it, or a Q6_K head), the
    projections in the formats of ``LAYER_TYPES``, layer 1's ``ffn_down`` in Q5_1 (kept float with a notice), norms
    F32. With ``tokenizer_dir`` (a byte-level BPE ``tokenizer.json``) the tokenizer is written in as llama.cpp writes
    a GPT-2-style one; without it, load the file with a tokenizer folder. ``arch="qwen2"`` writes the same model as
    a Qwen2 (q/k/v biases, F32; transformers reads its rows unpermuted)."""
    import json

    import gguf

    rng = np.random.default_rng(seed)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab_size)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    if tokenizer_dir is not None:
        bpe = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())["model"]
        tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types([1] * len(tokens))
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
        writer.add_eos_token_id(0)
        writer.add_bos_token_id(0)

    def add(name: str, qtype: str, rows: int, cols: int) -> None:
        if qtype == "F32":
            writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(rows)).astype(np.float32))
        elif qtype == "Q5_1":
            q5_1 = gguf.GGMLQuantizationType.Q5_1
            data = gguf.quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05, q5_1)
            writer.add_tensor(name, data, raw_dtype=q5_1)
        else:
            data = random_blocks(qtype, rows, cols // QTYPES[qtype].block, rng)
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[qtype])

    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (kv, HIDDEN), "attn_v": (kv, HIDDEN),
              "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
              "ffn_down": (HIDDEN, FFN)}  # fmt: skip
    add("token_embd.weight", "Q8_0", vocab_size, HIDDEN)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", "F32", HIDDEN, 1)
        add(f"blk.{i}.ffn_norm.weight", "F32", HIDDEN, 1)
        for layer, qtype in LAYER_TYPES.items():
            add(f"blk.{i}.{layer}.weight", "Q5_1" if (i, layer) == (1, "ffn_down") else qtype, *shapes[layer])
            if arch == "qwen2" and layer in ("attn_q", "attn_k", "attn_v"):
                add(f"blk.{i}.{layer}.bias", "F32", shapes[layer][0], 1)
    add("output_norm.weight", "F32", HIDDEN, 1)
    if not tied:
        add("output.weight", "Q6_K", vocab_size, HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
