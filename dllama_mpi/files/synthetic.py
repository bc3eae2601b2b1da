"""The built-in synthetic model: a small Llama shape with seeded random weights.

It lets the first command of the README run on a fresh machine with no model file. Its
weights are random, so its text is meaningless; the program says so when it uses it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..model.spec import ModelSpec
from .modelfile import tensor_layout, write_model
from .tokenizer import NUM_RESERVED, Tokenizer

SYNTHETIC_VERSION = 2
SYNTHETIC_SPEC = ModelSpec(
    dim=256, hidden_dim=704, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32,
    vocab_size=512, seq_len=512, weight_type="q40",
)


def synthetic_tensors(spec: ModelSpec, seed: int):
    """(name, f32 array) for every tensor of `spec`, one at a time; norms near 1, matrices
    scaled by 1/sqrt(fan-in) so activations stay in range over the layers. The (shared)
    classifier rows of the reserved tokens (specials and byte pieces) are shrunk, so the
    random text is made of word pieces rather than stray bytes."""
    rng = np.random.default_rng(seed)
    for name, info in tensor_layout(spec).items():
        if not info.matrix:
            if name.endswith("/router"):  # a mixture of experts' (experts, dim): logits of order 1
                yield name, (rng.standard_normal(info.shape) / np.sqrt(info.shape[1])).astype(np.float32)
            elif name.rsplit("/", 1)[-1] in ("bq", "bk", "bv"):
                yield name, (0.1 * rng.standard_normal(info.shape)).astype(np.float32)
            else:  # a norm weight
                yield name, (1 + 0.1 * rng.standard_normal(info.shape)).astype(np.float32)
            continue
        w = (rng.standard_normal(info.shape) / np.sqrt(info.shape[1])).astype(np.float32)
        if info.split in ("tok_embeddings", "output"):
            w[:NUM_RESERVED] *= 0.05
        yield name, w


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dllama_mpi"


def synthetic_model_path() -> Path:
    """The synthetic model file, written on first use (atomically, so concurrent jobs are safe)."""
    path = cache_dir() / f"synthetic-v{SYNTHETIC_VERSION}.h5"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_model(path, SYNTHETIC_SPEC, synthetic_tensors(SYNTHETIC_SPEC, seed=SYNTHETIC_VERSION),
                    Tokenizer.synthetic(SYNTHETIC_SPEC.vocab_size), {"source": "synthetic (random weights)"})
    return path


def write_hf_tokenizer(directory: Path, vocab_size: int, texts: list[str]) -> None:
    """A small byte-level BPE trained on `texts`, saved as a Hugging Face tokenizer
    (tokenizer.json + tokenizer_config.json with <s>/</s>): for random-weight checkpoints."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                  "add_bos_token": True}))
