"""Run specs (TOML, data only) for ``adaptbank run``."""
