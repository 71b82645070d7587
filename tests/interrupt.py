"""Run the trce CLI and interrupt it at an exact point: the deterministic kill of the kill/resume tests.

usage: python tests/interrupt.py SIGNAL EVENT N trce-args...

    SIGNAL  KILL, INT or TERM: what the process sends itself
    EVENT   records:NAME   after a batch of records is appended to NAME.jsonl (rows, results; trce.utils.records)
            file:GLOB      after a file or folder matching GLOB is put in place (os.replace: every atomic write,
                           every checkpoint folder)
    N       the signal goes at the N-th such event

The process signals itself right after the event, so the interruption lands at the same point of the run on any
machine, however loaded: no polling, no deadline. SIGINT is handled as a terminal's Ctrl-C would be even when the
test suite runs in the background (where SIGINT is ignored and children inherit that).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import signal
import sys


def main(argv: list[str]) -> int:
    sig, event, n, args = getattr(signal, "SIG" + argv[0]), argv[1], int(argv[2]), argv[3:]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    seen = [0]

    def happened() -> None:
        seen[0] += 1
        if seen[0] == n:
            os.kill(os.getpid(), sig)

    kind, _, what = event.partition(":")
    if kind == "records":
        from trce.utils.records import Records

        real = Records.appender

        @contextlib.contextmanager
        def appender(self):
            with real(self) as append:
                def counted(batch):
                    append(batch)
                    if self.path.stem == what:
                        happened()
                yield counted

        Records.appender = appender
    elif kind == "file":
        real_replace = os.replace

        def replace(src, dst, *a, **kw):
            real_replace(src, dst, *a, **kw)
            if fnmatch.fnmatch(os.fspath(dst), what):
                happened()

        os.replace = replace
    else:
        raise SystemExit(f"unknown event {event!r}")
    from trce.cli import main as trce

    return trce(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
