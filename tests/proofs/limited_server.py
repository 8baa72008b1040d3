"""Start the real server under operating-system limits, then become it (exec): stdlib only.

``python tests/proofs/limited_server.py [--fsize BYTES] [--no-dac-override] -- <command...>``

- ``--fsize``: ``RLIMIT_FSIZE``, the largest file this process may write. Past it a write fails with
  EFBIG, as on a full disk, instead of killing the process with SIGXFSZ (ignored here; an ignored
  signal stays ignored across exec).
- ``--no-dac-override``: for root only. Root writes through any file mode, so a read-only database
  would not be read-only to it; dropping CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding
  set makes the file modes bind again, for this process and everything it execs.

A launcher (rather than ``preexec_fn``) lets the tests keep the SDK's own stdio client, which spawns a
command but takes no pre-exec hook.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import signal
import sys

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2


def drop_dac_override() -> None:
    """Remove the capabilities that let root ignore file modes (no-op for other users)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(err)}")


def main() -> None:
    """Apply the limits, then exec the command."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--fsize", type=int)
    parser.add_argument("--no-dac-override", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.fsize is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize, args.fsize))
    if args.no_dac_override:
        drop_dac_override()
    sys.stdout.flush()
    os.execv(command[0], command)  # noqa: S606 - becoming the server is the point


if __name__ == "__main__":
    main()
