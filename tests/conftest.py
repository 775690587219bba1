"""Shared fixtures: where the real face datasets live (../shared/data beside the checkout), and a local
HTTP server on 127.0.0.1 for the download code (the tests never touch the internet)."""

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA} (expected ../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture
def local_http_server() -> Iterator[Callable[..., ThreadingHTTPServer]]:
    """``start(handler)`` serves ``handler`` on 127.0.0.1 (a free port: ``server_port``) in a thread;
    every server started is shut down at teardown, and a watchdog bounds it even if teardown never runs."""
    started: list[tuple[ThreadingHTTPServer, threading.Thread, threading.Timer]] = []

    def start(handler: Callable[..., BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        watchdog = threading.Timer(60, httpd.shutdown)
        watchdog.daemon = True
        watchdog.start()
        started.append((httpd, thread, watchdog))
        return httpd

    yield start
    for httpd, thread, watchdog in started:
        watchdog.cancel()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
