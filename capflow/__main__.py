"""``python -m capflow`` runs the ``capflow`` command."""

from capflow.cli import main

main()
