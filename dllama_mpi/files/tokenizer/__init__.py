"""Tokenizers: text to token ids and back, for every kind of vocabulary a model comes with.

Each kind shares the duck interface ``encode(text, bos=True, eos=False)``, ``decode(prev, tok) ->
bytes``, ``stream()``, ``bos_id``, ``eos_id``, ``eos_ids``, ``vocab_size``, ``min_tokens(text)``,
``chat_template``, ``write_hdf5(group)`` and, for chat prompts, ``token_text(id)``,
``split_special(text)`` and ``encode(..., special=False)``:

* llama2c.Tokenizer -- llama2.c's score BPE (its ``tokenizer.bin``; synthetic.py fills one for
  the built-in demo model);
* spm.SpmTokenizer -- sentencepiece vocabularies from GGUF, encoded like llama.cpp;
* hf.HFTokenizer -- anything the HF ``tokenizers`` library runs: byte-level BPE from GGUF and
  ``tokenizer.json`` model directories.

gguf.py reads a GGUF file's vocabulary (:func:`from_gguf`), hf_dir.py a Hugging Face model
directory's (:func:`from_hf_dir`), hdf5.py writes and reads the group of a converted model file
(:func:`load_tokenizer`); common.py holds what the kinds share.
"""

from .common import StreamDecoder
from .gguf import from_gguf
from .hdf5 import load_tokenizer
from .hf import HFTokenizer
from .hf_dir import from_hf_dir
from .llama2c import NUM_RESERVED, Tokenizer
from .spm import SpmTokenizer

__all__ = ["NUM_RESERVED", "HFTokenizer", "SpmTokenizer", "StreamDecoder", "Tokenizer", "from_gguf", "from_hf_dir",
           "load_tokenizer"]
