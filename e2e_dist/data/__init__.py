"""Data sources: one file per source kind, all registered in `registry.py`."""
