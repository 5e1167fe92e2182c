"""Keeping the ranks in step around what only one of them does, or only one sees.

Rank 0 alone writes the run directory (checkpoints, log, plot). If its write
fails and it raises while the others have gone on into the next collective, the
job hangs. `run_on_root` makes such work collective: rank 0 runs it, tells every
rank how it went, and on failure every rank raises the same exception, together.
An exception raised that way is marked `agreed`: all ranks are leaving at once,
so `abort_on_failure` lets it pass instead of aborting.

A stop signal (SIGTERM to one rank's process) is seen by that rank only;
`agreed_stop` shares it, so all ranks stop at the same step boundary.
"""

from __future__ import annotations

import pickle

from tinylm.distributed.flat import buckets_by_dtype


def run_on_root(comm, fn):
    """fn() on rank 0 only; every rank returns its (picklable) result, or every rank
    raises the exception it raised, marked `agreed`. With one rank: just fn()."""
    if comm.size == 1:
        return fn()
    outcome = None
    if comm.rank == 0:
        try:
            outcome = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - shared with every rank, then raised
            outcome = ("error", exc if _picklable(exc) else RuntimeError(str(exc)))
    kind, value = comm.broadcast_object(outcome)
    if kind == "error":
        value.agreed = True
        raise value
    return value


def agreed_stop(comm, requested: int | None) -> int | None:
    """The stop signal that any rank received (its number), or None: every rank calls
    this at the same step boundary and gets the same answer."""
    if comm.size == 1:
        return requested
    count, total = comm.allreduce_floats([requested is not None, requested or 0])
    return round(total / count) if count else None  # one signal, forwarded to all: exact


def broadcast_parameters(params, comm, root: int = 0) -> None:
    """Make every rank's parameters ((name, p, g) triples) equal to root's: a seeded
    initialisation already gives equal weights; this makes sure of it, in one message."""
    if comm.size == 1:
        return
    for bucket in buckets_by_dtype([p for _, p, _ in params]):
        comm.broadcast(bucket.pack(), root)
        bucket.unpack()


def _picklable(exc: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(exc))
        return True
    except Exception:  # noqa: BLE001 - any failure means: send a plain copy instead
        return False
