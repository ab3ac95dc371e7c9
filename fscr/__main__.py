"""`python -m fscr`: the same as the fscr command (`python -m fscr.cli` would load cli.py twice,
as __main__ and as fscr.cli, and cli_jobs would find the second one half-made)."""

from .cli import main

main()
