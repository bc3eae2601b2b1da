"""What a user types: python -m dllama_mpi [serve|chat|bench|perplexity|convert]."""
