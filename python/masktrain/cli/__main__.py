"""``python -m masktrain.cli``: the ``masktrain`` command."""

from masktrain.cli import main

main()
