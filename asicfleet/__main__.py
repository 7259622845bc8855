"""``python -m asicfleet`` is the same as the ``asicfleet`` command."""

from asicfleet.cli import main

main()
