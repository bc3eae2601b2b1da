from .llama2c import NUM_RESERVED, HFTokenizer, SpmTokenizer, StreamDecoder, Tokenizer, from_gguf, from_hf_dir, load_tokenizer

__all__ = ["NUM_RESERVED", "HFTokenizer", "SpmTokenizer", "StreamDecoder", "Tokenizer", "from_gguf", "from_hf_dir",
           "load_tokenizer"]
