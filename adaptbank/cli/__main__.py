"""``python -m adaptbank.cli``: the ``adaptbank`` command line."""

from adaptbank.cli.main import main

main()
