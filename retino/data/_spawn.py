"""Worker pools started with ``spawn``, safe to use from any process.

``spawn`` rather than ``fork``: a forked child inherits locks held by the parent's other threads
(a heartbeat, tqdm's monitor, torch's pools) and can hang forever. But ``spawn`` re-runs the
parent's ``__main__`` script in every worker when that module was loaded from a path; inside
Streamlit (and its AppTest) ``__main__`` is the page being rendered, which must not run again in a
worker. While the pool lives, such a ``__main__`` hides its file, so workers import only ``retino``.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import sys


@contextlib.contextmanager
def spawn_context():
    """A spawn context, with a path-loaded ``__main__`` kept out of the workers for its lifetime."""
    main = sys.modules.get("__main__")
    by_name = getattr(getattr(main, "__spec__", None), "name", None)  # python -m x: re-imported by name
    path = getattr(main, "__file__", None)
    hide = main is not None and by_name is None and path is not None  # workers need only retino's code
    if hide:
        del main.__file__
    try:
        yield mp.get_context("spawn")
    finally:
        if hide:
            main.__file__ = path
