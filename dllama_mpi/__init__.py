"""dllama_mpi: budget-proportional tensor-parallel Llama inference over MPI."""

import time

__version__ = "0.1.0"
# before any other module of the program loads: bench's "time to first token from launch" counts
# every import (numpy, numba, mpi4py), whichever command started the process
LAUNCHED = time.perf_counter()
