"""Reports of continual runs: read ``result.json`` files, summarise, render Markdown / HTML / JSON.
Torch-free: a report never re-runs a model."""
