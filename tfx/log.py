"""One rank-aware logger: rank 0 logs at INFO, other ranks only warnings and errors."""

from __future__ import annotations

import logging
import os
import sys


def get_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if not logging.getLogger("tfx").handlers:
        handler = logging.StreamHandler(sys.stderr)
        rank = os.environ.get("RANK", "0")
        handler.setFormatter(logging.Formatter(f"[%(asctime)s tfx r{rank}] %(message)s",
                                               "%H:%M:%S"))
        root = logging.getLogger("tfx")
        root.addHandler(handler)
        root.setLevel(logging.INFO if rank == "0" else logging.WARNING)
        root.propagate = False
    return logger
