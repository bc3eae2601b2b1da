"""What a model is: its hyperparameters (spec) and its weight types (quant)."""
