"""Models: one file per kind, all registered in `registry.py`."""
