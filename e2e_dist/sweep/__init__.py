"""Sweeps: specs of what varies (`spec`), and scaling-law fits of their results (`scaling`, `plot`)."""
