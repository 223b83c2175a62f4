"""``python -m serving.batch``.

The command imports onnxruntime, pyarrow and numpy first (about a quarter of a second). A Ctrl-C
(SIGINT) in that time ends the process at once with the one line and exit status 130 that ``main``
gives for an interrupted run, not a ``KeyboardInterrupt`` traceback: nothing has been written yet,
and a ``KeyboardInterrupt`` raised inside onnxruntime's C++ module start-up would come out as
``ImportError: initialization failed`` (exit 1), so the handler must not raise. ``main`` then
handles SIGINT itself (``KeyboardInterrupt``, clean-up of the partial output file).
"""

import os
import signal
import sys

_INTERRUPTED = "interrupted (SIGINT): no output written"


def _interrupted_while_starting(signum, frame):  # pragma: no cover - runs in the subprocess tests
    os.write(2, f"{_INTERRUPTED}\n".encode())
    os._exit(130)


def _run() -> int:
    # left alone when SIGINT is ignored (a command started in the background) or handled elsewhere
    own = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if own:
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    try:
        from serving.batch.cli import main  # the heavy imports

        if own:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return main()
    except KeyboardInterrupt:  # between the imports and main's own handling
        print(_INTERRUPTED, file=sys.stderr)
        return 130
    finally:
        # the work is over, done or abandoned: a Ctrl-C now could only print a traceback on the way out
        signal.signal(signal.SIGINT, signal.SIG_IGN)


sys.exit(_run())
