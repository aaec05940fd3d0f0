"""The core: frozen configs, expert kinds, the adapted layer, target injection, task heads, the model.

Nothing here reads files or trains; ``bank`` stores what ``core`` holds, ``training`` trains it.
"""
