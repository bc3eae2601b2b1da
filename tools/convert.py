#!/usr/bin/env python3
"""Convert a model into a dllama_mpi HDF5 model file (same as the `dllama-mpi-convert` command)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

from dllama_mpi.files.convert import main

sys.exit(main())
