"""dllama_mpi: budget-proportional tensor-parallel Llama inference over MPI."""

__version__ = "0.1.0"
