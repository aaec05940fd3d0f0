"""Task specs (TOML, data only): shipped inside the wheel as ``adaptbank.tasks``. Nothing here runs."""
