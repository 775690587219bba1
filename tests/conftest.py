"""Shared fixtures: the real faces that ship with the tests (tests/faces_data, see its README), aligned
crops made from them once per session, and a local HTTP server on 127.0.0.1 for the download code (the
tests never touch the internet)."""

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

FACES_DATA = Path(__file__).resolve().parent / "faces_data"


@pytest.fixture(scope="session")
def faces_data() -> Path:
    """``orl/``, ``yale/`` and ``five_celebrity/``, each ``<identity>/<image>`` (read-only: copy to change)."""
    return FACES_DATA


@pytest.fixture(scope="session")
def five_celebrity_aligned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The five-celebrity photos detected and aligned to 112 x 112 by ``facecls prepare`` (YuNet), as
    ``<identity>/<image>``: real in-the-wild faces in the layout the face-pretrained recipes expect."""
    from facecls.commands.prepare import prepare_folder

    out = tmp_path_factory.mktemp("five_celebrity") / "aligned"
    prepare_folder(FACES_DATA / "five_celebrity", out, size=112, progress=False)
    return out


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
