"""``python -m facecls.runtime.torchrun ARGS``: torchrun (``torch.distributed.run``), as ``facecls train
--nproc`` starts it.

Sent Ctrl-C or SIGTERM, torchrun passes the signal on to its workers and waits for them: they stop together
after a step and save it (engine.loop.StopOnSignal), and one of them prints how to resume. torchrun then
raises the signal as an exception, whose traceback would follow that one line. Here the exception ends the
process with the shell's status for the signal (130, 143) instead. Any other failure is torchrun's own
report."""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torchrun_main


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun_main(argv)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
