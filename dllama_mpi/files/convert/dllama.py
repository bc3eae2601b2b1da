"""b4rtaz/distributed-llama models (`.m`) with their tokenizer (`.t`).

Format (from b4rtaz/distributed-llama: converter/writer.py writeHeader / writeTensor,
converter/convert-hf.py, src/llm.hpp LlmHeaderKey, src/llm.cpp loadLlmHeader /
loadLlmNetWeight, src/tokenizer.cpp, converter/tokenizer-writer.py), little-endian:

  .m  int32 magic 0x0A00ABCD, int32 header_size (bytes from the file start to the first
      weight: 8 + 8 * n_pairs), then n_pairs of int32 (key, value): version 0, arch type 1
      (0xABCD00 llama, 0xABCD01 qwen3, 0xABCD02 qwen3 moe), dim 2, hidden dim 3, n_layers 4,
      n_heads 5, n_kv_heads 6, n_experts 7, n_active_experts 8, vocab size 9, seq len 10,
      hidden act 11 (0 gelu, 1 silu), rope theta 12 (int), weight float type 13 (0 f32,
      1 f16, 2 q40, 3 q80), rope scaling factor 14, low freq factor 15, high freq factor 16,
      original max seq len 17, rope type 18 (0 llama, 1 falcon, 2 llama3.1), head dim 19,
      norm epsilon 20 (5 -> 1e-5, 6 -> 1e-6), moe hidden dim 21.
      Then the tensors: embedding (f32), per layer q, k, v, wo, w1 (gate), w2 (down),
      w3 (up) in the weight type, [qwen3: q_norm, k_norm (head_dim f32)], attention norm,
      ffn norm (f32); final norm (f32); classifier (weight type, always present).
      Q40 blocks: fp16 d + 16 bytes, element j the low nibble of byte j, element j+16 its
      high nibble (writer.py) = llama.cpp's block_q4_0 = quant.Q40; Q80: fp16 d + 32 int8.
  RoPE: convert-hf.py permutes llama q/k from Hugging Face halves to interleaved pairs and
      the engine's ROPE_LLAMA rotates (x[i], x[i+1]): already our layout. qwen3 is not
      permuted and runs ROPE_FALCON (halves): q/k rows and q/k norms are reordered here.
  .t  int32 magic 0x567124, int32 header_size (8 + 8 * n_pairs), pairs: version 0 (must be
      1), vocab size 1, max token length 2, bos id 3, eos id 4, pad id 5, chat eos id 6,
      chat template length 7, chat stop length 8, n eos tokens 9, add bos 10; then the chat
      stop bytes / chat template bytes, n_eos int32 eos ids, and per token: f32 score,
      uint32 length, bytes. (Old magic 0x567123: 5 int32 vocab size, max token length, bos,
      eos, pad.)
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ...errors import InputError
from ...model import quant
from ..tokenizer import Tokenizer
from . import MATRICES, ConvertError
from .rope import halves_to_interleaved

FORMAT_NAME = "distributed-llama model (.m)"
MAGIC = 0x0A00ABCD
OLD_MAGICS = (0xABCD00, 0xABCD01)
TOKENIZER_MAGIC = 0x567124
OLD_TOKENIZER_MAGIC = 0x567123

HEADER_KEYS = {
    0: "version", 1: "arch_type", 2: "dim", 3: "hidden_dim", 4: "n_layers", 5: "n_heads",
    6: "n_kv_heads", 7: "n_experts", 8: "n_active_experts", 9: "vocab_size", 10: "seq_len",
    11: "hidden_act", 12: "rope_theta", 13: "weight_type", 14: "rope_scaling_factor",
    15: "rope_scaling_low_freq_factor", 16: "rope_scaling_high_freq_factor",
    17: "rope_scaling_orig_max_seq_len", 18: "rope_type", 19: "head_dim", 20: "norm_epsilon",
    21: "moe_hidden_dim",
}
ARCH_LLAMA, ARCH_QWEN3, ARCH_QWEN3_MOE = 0xABCD00, 0xABCD01, 0xABCD02
ARCH_NAMES = {ARCH_LLAMA: "llama", ARCH_QWEN3: "qwen3"}
FLOAT_TYPES = {t.dllama_code: t.name for t in quant.WEIGHTS.values() if t.dllama_code is not None}
ROPE_LLAMA, ROPE_FALCON, ROPE_LLAMA3_1 = 0, 1, 2
NORM_EPSILONS = {5: 1e-5, 6: 1e-6}
TOKENIZER_KEYS = {0: "version", 1: "vocab_size", 2: "max_token_length", 3: "bos_id", 4: "eos_id",
                  5: "pad_id", 6: "chat_eos_id", 7: "chat_template", 8: "chat_stop",
                  9: "n_eos_tokens", 10: "add_bos"}


def _raw_header(path: Path) -> tuple[int, dict[str, int]]:
    """(header_size, {name: value}); ConvertError on anything malformed."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 4:
            raise ConvertError(f"{path}: too short for a distributed-llama model ({len(head)} bytes)")
        (magic,) = struct.unpack_from("<i", head)
        if magic in OLD_MAGICS:
            raise ConvertError(f"{path}: old distributed-llama model format (magic {magic:#x}); re-convert it "
                             "with a current distributed-llama converter")
        if magic != MAGIC:
            raise ConvertError(f"{path}: bad magic {magic & 0xFFFFFFFF:#x}, expected {MAGIC:#x} (distributed-llama .m)")
        if len(head) < 8:
            raise ConvertError(f"{path}: truncated distributed-llama header (no header size)")
        (size,) = struct.unpack_from("<i", head, 4)
        if size < 8 or (size - 8) % 8 or size > 8 + 8 * 1024:
            raise ConvertError(f"{path}: bad distributed-llama header size {size}")
        body = f.read(size - 8)
    if len(body) < size - 8:
        raise ConvertError(f"{path}: truncated distributed-llama header ({8 + len(body)} of {size} bytes)")
    values = {}
    for key, value in struct.iter_unpack("<ii", body):
        if key not in HEADER_KEYS:
            raise ConvertError(f"{path}: unknown distributed-llama header key {key}")
        values[HEADER_KEYS[key]] = value
    return size, values


def _header(path: Path) -> tuple[int, dict]:
    size, h = _raw_header(path)
    missing = [k for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len",
                           "weight_type") if k not in h]
    if missing:
        raise ConvertError(f"{path}: distributed-llama header lacks {missing}")
    arch = h.get("arch_type", ARCH_LLAMA)
    if arch == ARCH_QWEN3_MOE or h.get("n_experts", 0) > 0:
        raise ConvertError(f"{path}: mixture-of-experts distributed-llama models are not read; convert the model's "
                           "Hugging Face checkpoint or a GGUF of it instead (qwen3_moe, qwen3moe: both supported)")
    if arch not in ARCH_NAMES:
        raise ConvertError(f"{path}: unknown distributed-llama architecture {arch:#x}")
    if h.get("hidden_act", 1) != 1:
        raise ConvertError(f"{path}: hidden activation {h['hidden_act']} (gelu) is not supported; only silu")
    if h["weight_type"] not in FLOAT_TYPES:
        raise ConvertError(f"{path}: unknown weight float type {h['weight_type']}")
    if "norm_epsilon" in h and h["norm_epsilon"] not in NORM_EPSILONS:
        raise ConvertError(f"{path}: unsupported norm epsilon code {h['norm_epsilon']}")
    if min(h[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")) <= 0:
        raise ConvertError(f"{path}: non-positive sizes in the distributed-llama header: {h}")
    head_dim = h.get("head_dim") or h["dim"] // h["n_heads"]
    fields = dict(
        dim=h["dim"], hidden_dim=h["hidden_dim"], n_layers=h["n_layers"], n_heads=h["n_heads"],
        n_kv_heads=h["n_kv_heads"], head_dim=head_dim, vocab_size=h["vocab_size"], seq_len=h["seq_len"],
        norm_eps=NORM_EPSILONS[h.get("norm_epsilon", 5)], rope_theta=float(h.get("rope_theta", 10000)),
        shared_classifier=False, architecture=ARCH_NAMES[arch],
    )
    if arch == ARCH_QWEN3:
        fields["qk_norm"] = True
    if h.get("rope_type", ROPE_LLAMA) == ROPE_LLAMA3_1:
        fields.update(rope_scaling="llama3", rope_scaling_factor=float(h.get("rope_scaling_factor", 1)),
                      rope_low_freq_factor=float(h.get("rope_scaling_low_freq_factor", 0)),
                      rope_high_freq_factor=float(h.get("rope_scaling_high_freq_factor", 0)),
                      rope_original_max_position=int(h.get("rope_scaling_orig_max_seq_len", 0)))
    return size, dict(fields=fields, weight_type=FLOAT_TYPES[h["weight_type"]], arch=arch)


def _layout(info: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(our name, stored type, dense shape) in file order."""
    f, wt = info["fields"], info["weight_type"]
    dim, hidden, hd = f["dim"], f["hidden_dim"], f["head_dim"]
    q_dim, kv_dim = f["n_heads"] * hd, f["n_kv_heads"] * hd
    out = [("tok_embeddings", "f32", (f["vocab_size"], dim))]
    for i in range(f["n_layers"]):
        p = f"layers/{i}/"
        out += [(p + "wq", wt, (q_dim, dim)), (p + "wk", wt, (kv_dim, dim)), (p + "wv", wt, (kv_dim, dim)),
                (p + "wo", wt, (dim, q_dim)), (p + "w1", wt, (hidden, dim)), (p + "w2", wt, (dim, hidden)),
                (p + "w3", wt, (hidden, dim))]
        if info["arch"] == ARCH_QWEN3:
            out += [(p + "q_norm", "f32", (hd,)), (p + "k_norm", "f32", (hd,))]
        out += [(p + "attention_norm", "f32", (dim,)), (p + "ffn_norm", "f32", (dim,))]
    out += [("norm", "f32", (dim,)), ("output", wt, (f["vocab_size"], dim))]
    return out


def _stored_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stored shape of a tensor of dense `shape`: its rows in elements of type `kind`."""
    values = quant.WEIGHTS[kind].block_values
    if shape[-1] % values:
        raise ConvertError(f"a {kind} tensor of shape {shape} has rows that are not whole {values}-value blocks")
    return (*shape[:-1], quant.stored_cols(kind, shape[-1]))


def _nbytes(kind: str, shape: tuple[int, ...]) -> int:
    return quant.stored_dtype(kind).itemsize * int(np.prod(_stored_shape(kind, shape)))


def sniff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and struct.unpack("<i", head)[0] == MAGIC


def read_tokenizer(path: str | Path) -> Tokenizer:
    """A distributed-llama .t tokenizer as a score-BPE Tokenizer (sentencepiece-style vocabularies)."""
    path = Path(path)
    data = path.read_bytes()

    def need(offset: int, n: int, what: str) -> None:
        if offset + n > len(data):
            raise ConvertError(f"{path}: truncated distributed-llama tokenizer (while reading {what})")

    need(0, 4, "magic")
    (magic,) = struct.unpack_from("<i", data, 0)
    eos_ids: list[int] = []
    if magic == OLD_TOKENIZER_MAGIC:
        need(4, 20, "header")
        vocab_size, max_len, bos_id, eos_id, _pad = struct.unpack_from("<IIiii", data, 4)
        eos_ids.append(eos_id)
        offset = 24
    elif magic == TOKENIZER_MAGIC:
        need(4, 4, "header size")
        (size,) = struct.unpack_from("<i", data, 4)
        if size < 8 or (size - 8) % 8:
            raise ConvertError(f"{path}: bad distributed-llama tokenizer header size {size}")
        need(8, size - 8, "header")
        h = {}
        offset = size
        for key, value in struct.iter_unpack("<ii", data[8:size]):
            if key not in TOKENIZER_KEYS:
                raise ConvertError(f"{path}: unknown distributed-llama tokenizer header key {key}")
            name = TOKENIZER_KEYS[key]
            if name in ("eos_id", "chat_eos_id"):
                eos_ids.append(value)
            elif name == "chat_stop":  # the C++ reader skips these bytes as it meets the key
                offset += value
            else:
                h[name] = value
        if h.get("version") != 1:
            raise ConvertError(f"{path}: distributed-llama tokenizer version {h.get('version')} is not supported (need 1)")
        for k in ("vocab_size", "bos_id"):
            if k not in h:
                raise ConvertError(f"{path}: distributed-llama tokenizer header lacks {k}")
        vocab_size, bos_id, max_len = h["vocab_size"], h["bos_id"], h.get("max_token_length", 0)
        offset += max(h.get("chat_template", 0), 0)
        n_eos = h.get("n_eos_tokens", 0)
        if n_eos < 0:
            raise ConvertError(f"{path}: distributed-llama tokenizer header says {n_eos} eos tokens")
        need(offset, 4 * n_eos, "eos ids")
        eos_ids += list(struct.unpack_from(f"<{n_eos}i", data, offset))
        offset += 4 * n_eos
    else:
        raise ConvertError(f"{path}: bad magic {magic & 0xFFFFFFFF:#x}, expected {TOKENIZER_MAGIC:#x} "
                         "(distributed-llama .t tokenizer)")
    if vocab_size <= 0 or max_len < 1:
        raise ConvertError(f"{path}: bad tokenizer header (vocab size {vocab_size}, max token length {max_len})")
    if vocab_size > (len(data) - offset) // 8:  # each token takes at least its 8-byte (score, length)
        raise ConvertError(f"{path}: the header says {vocab_size} tokens but the file has room for at most "
                         f"{max(0, len(data) - offset) // 8}; it is truncated or damaged")
    pieces, scores = [], np.empty(vocab_size, dtype=np.float32)
    for i in range(vocab_size):
        need(offset, 8, f"token {i}")
        score, length = struct.unpack_from("<fI", data, offset)
        offset += 8
        need(offset, length, f"token {i}")
        pieces.append(data[offset : offset + length])
        scores[i] = score
        offset += length
    if offset != len(data):
        raise ConvertError(f"{path}: {len(data) - offset} unexpected bytes after the last token")
    if not eos_ids:
        raise ConvertError(f"{path}: distributed-llama tokenizer names no eos token")
    try:
        return Tokenizer(pieces, scores, bos_id=bos_id, eos_id=eos_ids[0])
    except InputError as exc:
        raise ConvertError(f"{path}: this vocabulary can't be used as a sentencepiece score-BPE tokenizer "
                           f"(byte-level BPE vocabularies such as Llama 3's are not supported): {exc}") from exc


def read(path: Path, tokenizer_path):
    from . import Source

    path = Path(path)
    header_size, info = _header(path)
    actual, f = path.stat().st_size, info["fields"]
    if f["n_layers"] * 8 * f["dim"] > actual:  # each layer holds at least its two f32 norms
        raise ConvertError(f"{path}: the header describes {f['n_layers']} layers of dim {f['dim']}, more than this "
                         f"{actual}-byte file holds; it is truncated or not a distributed-llama model")
    layout = _layout(info)
    expected = header_size + sum(_nbytes(kind, shape) for _, kind, shape in layout)
    if actual != expected:
        raise ConvertError(f"{path}: file is {actual} bytes, the header describes {expected}; it is truncated "
                         "or not a distributed-llama model of this layout")
    if not tokenizer_path:
        raise ConvertError("a distributed-llama model needs its tokenizer: pass --tokenizer PATH (the .t file)")
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise ConvertError(f"distributed-llama tokenizer {tokenizer_path} is not a file; pass --tokenizer PATH (the .t file)")
    tokenizer = read_tokenizer(tokenizer_path)
    fields = info["fields"]
    notes = []
    if tokenizer.vocab_size != fields["vocab_size"]:
        notes.append(f"tokenizer has {tokenizer.vocab_size} tokens, the model {fields['vocab_size']}")
    halves = info["arch"] == ARCH_QWEN3
    head_dim = fields["head_dim"]

    def tensors():
        data = np.memmap(path, dtype=np.uint8, mode="r")
        offset = header_size
        for name, kind, shape in layout:
            n = _nbytes(kind, shape)
            raw = data[offset : offset + n]
            offset += n
            array = np.array(raw).view(quant.stored_dtype(kind)).reshape(_stored_shape(kind, shape))
            if halves and name.rsplit("/", 1)[-1] in ("wq", "wk", "q_norm", "k_norm"):
                array = halves_to_interleaved(array, head_dim)
            yield name, array

    native_types = {name: quant.WEIGHTS[kind].gguf for name, kind, _ in layout  # the names choose_types reads
                    if name.rsplit("/", 1)[-1] in MATRICES}
    return Source(fields, tensors, tokenizer, f"distributed-llama {fields['architecture']} model {path.name} "
                  f"({info['weight_type']})", files=[path, tokenizer_path], notes=notes, native_types=native_types)
