"""A loaded job: scatter the weights, run a step, sample; budgets measured on it."""
