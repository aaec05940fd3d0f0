"""Routing: the gates-only state every adapted layer reads, the incremental LDA router and the taps
that feed it inside the forward, token-level gates, and task-agnostic prediction."""
