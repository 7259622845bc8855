"""Schema revisions, oldest first (``0001_…``, ``0002_…``). Generated, then reviewed."""
