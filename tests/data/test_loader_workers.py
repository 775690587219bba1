"""Loader workers stay quiet when the main process is killed: the reset of the shared-memory handshake
that the kill causes prints no traceback; every other error in a worker still does."""

import subprocess
import sys

# A process that serves a file descriptor through multiprocessing's resource sharer (as a loader worker
# does for every batch), and a client that connects and dies without reading the server's challenge (as
# a killed main process does): the server's read fails with "connection reset by peer".
PROBE = """
import os, socket, sys, time
from multiprocessing import resource_sharer
if sys.argv[1] == "worker":
    from facecls.data.pipeline import _init_worker
    _init_worker(0)
r, w = os.pipe()
resource_sharer.DupFd(r)
client = socket.socket(socket.AF_UNIX)
client.connect(resource_sharer._resource_sharer._address)
time.sleep(0.3)
client.close()
time.sleep(0.5)
try:
    raise ValueError("a real error")
except ValueError:
    sys.excepthook(*sys.exc_info())
"""


def _stderr(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_a_worker_does_not_print_the_reset_handshake_of_a_killed_main_process():
    plain = _stderr("plain")
    assert "ConnectionResetError" in plain and "resource_sharer.py" in plain  # the control: what users saw
    worker = _stderr("worker")
    assert "ConnectionResetError" not in worker and "resource_sharer" not in worker
    assert "ValueError: a real error" in worker  # other errors still reach the terminal
