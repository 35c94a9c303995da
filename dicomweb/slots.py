"""How much memory conversions may hold, all requests together: the slots of
``dicomweb.wado`` and ``dicomweb.app``.

``DECODE_SLOTS`` bound the decodes running at once (a frame decompressed, an instance
rendered or parsed by pydicom); ``WHOLE_INSTANCE_SLOTS`` the conversions that hold a whole
instance (encodings, Big Endian or deflated sources), each from reading the file until its
converted bytes are sent or dropped (``Held``).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from storage.errors import StorageUnavailable

# Decoding at once: a frame of an instance being decompressed, or an instance converted,
# rendered, searched for frames or nested bulk data by pydicom, which holds it decoded (a
# deflated one inflated, up to 256 MiB, which pydicom then copies), so a few at once could take
# gigabytes. On more, requests wait; the work is CPU-bound, so more at once than cores would not
# be faster anyway.
DECODE_SLOTS = threading.BoundedSemaphore(max(2, len(os.sched_getaffinity(0))))
# Instances held whole for a conversion (the stored file, pydicom's data set and the result:
# about three times the instance), from reading the file until the converted bytes are sent or
# dropped: a slow client keeps its slot, not more. Apart from DECODE_SLOTS, so renderings never
# wait for a download. A request that waits longer than WHOLE_INSTANCE_WAIT seconds gets 503.
WHOLE_INSTANCE_SLOTS = threading.BoundedSemaphore(max(2, len(os.sched_getaffinity(0))))
WHOLE_INSTANCE_WAIT = 120.0
# Requests waiting for a whole-instance slot at once; one more gets 503 at once. A waiter
# blocks a thread of the pool every request shares, and the conversions holding the slots need
# that pool to send their bytes: unbounded, waiters would starve them and every other route.
WHOLE_INSTANCE_WAITERS = 2 * WHOLE_INSTANCE_SLOTS._initial_value
_waiting = threading.BoundedSemaphore(WHOLE_INSTANCE_WAITERS)
# Stored files up to this size are read in one request for a conversion (the 1 MiB piece a
# streamed answer holds anyway); larger ones by byte range.
SMALL_INSTANCE = 1 << 20


class ConversionBusy(StorageUnavailable):
    """Every slot for whole-instance conversions stayed taken (HTTP 503)."""


def whole_instance_slot() -> _Once:
    """A slot of ``WHOLE_INSTANCE_SLOTS`` (its release), once one is free.

    An answer whose client went away gives its slot back when the app closes its chunks
    (``dicomweb.app._ClosingStream``); chunks dropped elsewhere may wait in a reference cycle
    for the garbage collector, so a request waiting for a slot has the garbage collected now
    and then."""
    if WHOLE_INSTANCE_SLOTS.acquire(blocking=False):
        return _Once(WHOLE_INSTANCE_SLOTS.release)
    if not _waiting.acquire(blocking=False):
        raise ConversionBusy(
            f"the server is converting as many instances as it holds in memory at once "
            f"({WHOLE_INSTANCE_SLOTS._initial_value}) and {WHOLE_INSTANCE_WAITERS} more are "
            "waiting; try again shortly, or ask for transfer-syntax=* (as stored)")
    try:
        deadline = time.monotonic() + WHOLE_INSTANCE_WAIT
        wait = 1.0
        while not WHOLE_INSTANCE_SLOTS.acquire(timeout=max(0.0, min(wait, deadline
                                                                     - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise ConversionBusy(
                    f"the server is converting as many instances as it holds in memory at "
                    f"once ({WHOLE_INSTANCE_SLOTS._initial_value}) and none was sent within "
                    f"{WHOLE_INSTANCE_WAIT:.0f} s; try again, or ask for transfer-syntax=* "
                    "(as stored)")
            _collect_garbage()
            wait = 5.0
    finally:
        _waiting.release()
    return _Once(WHOLE_INSTANCE_SLOTS.release)


_collected_at = [0.0]
_collecting = threading.Lock()


def _collect_garbage() -> None:
    """``gc.collect()``, at most once a second whoever asks (it stops every thread)."""
    with _collecting:
        if time.monotonic() - _collected_at[0] >= 1.0:
            gc.collect()
            _collected_at[0] = time.monotonic()


class _Once:
    """``action`` run at most once, whoever calls first."""

    def __init__(self, action: Callable[[], object]) -> None:
        self._action, self._lock = action, threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            action, self._action = self._action, None
        if action is not None:
            action()


class Held:
    """Chunks holding a slot until the last is taken, or the writer stops taking them (a
    client gone), or they are dropped before the writer got to them.

    Given out in pieces of at most 1 MiB: the server hands a piece to the connection's buffer
    and asks for the next once that buffer has drained, so the slot is held while the bytes
    are sent; one 100 MB chunk would be taken at once, and sit in that buffer slot-free."""

    def __init__(self, chunks: Iterable[bytes], release: _Once) -> None:
        self._chunks: Iterable[bytes] | None = chunks
        self._release = release

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._chunks or ():
                view = memoryview(chunk)
                for at in range(0, len(view), SMALL_INSTANCE):
                    yield bytes(view[at:at + SMALL_INSTANCE])
        finally:
            self._chunks = None  # the converted bytes go before the slot does
            self._release()

    def __del__(self) -> None:
        self._release()
