"""``python -m wsipipe.cli``: the same as the ``wsipipe`` command."""

from wsipipe.cli import main

main()
