"""Who holds what: the partition plan, budgets, the rank's thread policy and the one module that talks to MPI."""
