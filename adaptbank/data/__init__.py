"""Data: task specs (shipped inside the package, plus ``ADAPTBANK_TASKS``), the built-in generated
tasks, readers for JSONL / CSV / Hugging Face datasets, and tokenising, collating and batching."""
