"""The stop request, caught from the first moment of a trainer process (before torch is imported).

The dashboard may press Stop while the process is still starting; Python's default SIGTERM action
would kill it without a word, so the flag is set here and handed to the training loop later.
"""
import signal
import threading

STOP = threading.Event()


def install() -> None:
    def handler(signum, frame):
        STOP.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
