"""``python -m vprompt`` runs the CLI."""

from vprompt.cli import main

main()
