"""Matplotlib for the result plots, when it is installed (a GPU machine may lack it: the
tables and JSON are the results, the PNGs a view of them)."""

from __future__ import annotations


def pyplot():
    """`matplotlib.pyplot` with the file-only Agg backend, or None when not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
