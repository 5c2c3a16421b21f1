"""``python -m cli``: the ``imagegen`` command."""

from cli.main import main

main()
