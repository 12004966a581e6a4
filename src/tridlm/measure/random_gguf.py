"""Random-weight GGUF files of larger llama shapes, for timing without downloading a model.

Each file has the default model's tokenizer (its `tokenizer.*` metadata copied), Q4_1 projections and a Q8_0 tied
embedding as llama.cpp's Q4_1 conversions of SmolLM2 have, and float32 norms of ones. The 4-bit codes and 8-bit
values are seeded uniform random bytes with scales that give weights of about 0.02 standard deviation, written one
tensor at a time (a 3B file needs no more memory than its largest tensor).

    .venv/bin/python -m tridlm.measure.random_gguf 360m 1.7b 3b --out /tmp/gguf   # writes /tmp/gguf/random-<shape>.gguf
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

from tridlm import default_model

# name: (dim, layers, heads, kv heads, ffn); the vocabulary is the default model's (49152)
SHAPES = {
    "360m": (960, 32, 15, 5, 2560),  # SmolLM2-360M
    "1.7b": (2048, 24, 32, 32, 8192),  # SmolLM2-1.7B
    "3b": (3072, 28, 24, 8, 8192),  # Llama-3.2-3B's blocks
}
STD = 0.02
Q4_1, Q8_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.chat_template",
)


def _q4_1(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Q4_1 blocks (float16 d, float16 m, 16 code bytes): codes uniform in 0..15, w = d q + m centred on 0."""
    blocks = rng.integers(0, 256, (rows, cols // 32, 20), dtype=np.uint8)
    d = np.float16(STD / np.sqrt((16**2 - 1) / 12))
    blocks[..., 0:2] = np.frombuffer(d.tobytes(), np.uint8)
    blocks[..., 2:4] = np.frombuffer(np.float16(-7.5 * d).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def _q8_0(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Q8_0 blocks (float16 d, 32 int8 values), values uniform in -127..127."""
    blocks = rng.integers(-127, 128, (rows, cols // 32, 34), dtype=np.int8).view(np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(STD / np.sqrt(255**2 / 12)).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def _tensors(shape: tuple[int, ...], vocab: int):
    """(name, rows, cols, type) of every tensor, in llama.cpp's order."""
    dim, layers, heads, kv, ffn = shape
    head_dim = dim // heads
    yield "token_embd.weight", vocab, dim, Q8_0
    for i in range(layers):
        yield f"blk.{i}.attn_norm.weight", 1, dim, None
        yield f"blk.{i}.attn_q.weight", dim, dim, Q4_1
        yield f"blk.{i}.attn_k.weight", kv * head_dim, dim, Q4_1
        yield f"blk.{i}.attn_v.weight", kv * head_dim, dim, Q4_1
        yield f"blk.{i}.attn_output.weight", dim, dim, Q4_1
        yield f"blk.{i}.ffn_norm.weight", 1, dim, None
        yield f"blk.{i}.ffn_gate.weight", ffn, dim, Q4_1
        yield f"blk.{i}.ffn_up.weight", ffn, dim, Q4_1
        yield f"blk.{i}.ffn_down.weight", dim, ffn, Q4_1
    yield "output_norm.weight", 1, dim, None


def write(path: Path, name: str, seed: int = 0) -> Path:
    """Write the random-weight GGUF of shape ``name`` (a key of SHAPES) to ``path``."""
    dim, layers, heads, kv, ffn = SHAPES[name]
    source = gguf.GGUFReader(str(default_model.gguf_path()))
    tokens = source.fields["tokenizer.ggml.tokens"].contents()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"random-{name}")
    writer.add_block_count(layers)
    writer.add_context_length(8192)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(100000.0)
    writer.add_rope_dimension_count(dim // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    for key in _TOKENIZER_KEYS:
        field = source.fields[key]
        value_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else field.types[0]
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=value_type)
    specs = list(_tensors(SHAPES[name], len(tokens)))
    for tensor, rows, cols, kind in specs:
        if kind is None:
            writer.add_tensor_info(tensor, (cols,), np.dtype(np.float32), cols * 4)
        else:
            nbytes = rows * cols // 32 * gguf.GGML_QUANT_SIZES[kind][1]
            writer.add_tensor_info(tensor, (rows, nbytes // rows), np.dtype(np.uint8), nbytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _, rows, cols, kind in specs:
        data = {None: lambda *_: np.ones(cols, np.float32), Q4_1: _q4_1, Q8_0: _q8_0}[kind](rng, rows, cols)
        writer.write_tensor_data(data)
    writer.close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shapes", nargs="+", choices=list(SHAPES))
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.shapes:
        path = write(args.out / f"random-{name}.gguf", name, args.seed)
        print(f"{path}: {path.stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
