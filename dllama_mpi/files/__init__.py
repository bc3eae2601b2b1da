"""Bytes on disk: the HDF5 model format, GGUF reading, tokenizers, atomic output and the converter."""
