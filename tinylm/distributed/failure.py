"""A failing rank must end the job, not leave the others waiting forever.

The collectives block until every rank arrives. If rank 1 raises while rank 0 is
inside an allreduce, rank 0 waits for a message that never comes; worse, Python's
exit on rank 1 calls MPI_Finalize, which waits for rank 0 too: the job hangs,
silently, until someone kills it. (A rank killed by a signal is different:
Open MPI's mpirun sees the process die and ends the whole job itself.)

`abort_on_failure(comm)` wraps a rank's work: an exception escaping it is printed
with the rank's number, then MPI_Abort ends every rank, and mpirun exits non-zero.

    comm = distributed.init()
    with distributed.abort_on_failure(comm):
        train(...)

With one process, a normal exit (SystemExit(0)), or an exception that every rank
raised together (marked `agreed`, coordination.py), the exception passes through as
usual. `python -m mpi4py script.py` does the same for a whole script.
"""

from __future__ import annotations

import contextlib
import sys
import traceback


@contextlib.contextmanager
def abort_on_failure(comm, exit_code: int = 1, stream=None):
    """Run the body; if it raises on this rank of a multi-rank job, print the error
    (prefixed with the rank) and abort every rank with `exit_code`."""
    try:
        yield comm
    except BaseException as exc:
        if getattr(exc, "agreed", False):
            raise  # every rank raised it together (coordination.py): nobody is left waiting
        if comm.size == 1:
            raise
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise  # a normal exit
        _report(comm, exc, stream)
        code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else \
            exit_code
        comm.abort(code)  # MPI: never returns; simulated ranks: wakes the others
        raise


def _report(comm, exc: BaseException, stream) -> None:
    stream = sys.stderr if stream is None else stream
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    prefix = f"[rank {comm.rank} of {comm.size}] "
    stream.write("".join(prefix + line + "\n" for line in text.rstrip("\n").split("\n")))
    stream.write(f"{prefix}aborting the job: {type(exc).__name__}: {exc}\n")
    stream.flush()
