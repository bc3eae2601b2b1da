"""Per-rank arithmetic: vector ops, quantized products, and their plain-numpy twins (reference)."""
