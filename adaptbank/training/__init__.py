"""Training: the one loop (explicit loss terms, seeded without touching the global RNG), the linear
probe that initialises heads, and evaluation."""
