"""tensorboardX's event files, written out on demand and shut down cleanly on a full or read-only disk.

tensorboardX writes each event file from a thread of its own; its ``flush()`` leaves queued events in
memory, and a failed write (ENOSPC) leaves events in its buffers that every later flush, its thread and
its exit hook try again, each with a traceback. :class:`callbacks.TensorBoard` uses these three helpers
so that a checkpoint never precedes its points on disk, and a full disk is one error naming the folder.
They reach into tensorboardX's writer classes, and leave a layout they do not know as it is.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["shut_down_on_os_error", "write_out", "discard_events"]


@contextlib.contextmanager
def shut_down_on_os_error(writer: Any, log_dir: Path) -> Iterator[None]:
    """On an OSError inside: shut ``writer`` (a tensorboardX SummaryWriter) down and re-raise it naming ``log_dir``.

    A failed write leaves events in tensorboardX's buffers that every later flush, its thread and its
    exit hook would try (and fail) to write again, each with a traceback: each event file's record
    writer is swapped for one that writes nothing, its thread is stopped, and the real file is closed.
    """
    try:
        yield
    except OSError as e:
        for file_writer in list((getattr(writer, "all_writers", None) or {}).values()):
            discard_events(file_writer)
        if e.filename is None:
            e.filename = str(log_dir)
        raise


def write_out(file_writer: Any) -> None:
    """Write every event queued so far to one tensorboardX FileWriter's file, and flush it.

    tensorboardX's own ``flush()`` flushes the file but not its queue: the events its thread has not
    taken yet (the latest ones) stay in memory, and a run killed right after a checkpoint would lose
    points that precede it. The thread is stopped (the queue is first-in first-out, so it writes
    everything queued before the stop), the file flushed, and a new thread started, as tensorboardX's
    ``reopen`` does.
    """
    event_file_writer = getattr(file_writer, "event_writer", None)
    worker = getattr(event_file_writer, "_worker", None)
    if worker is None or getattr(event_file_writer, "_closed", True) or not worker.is_alive():
        file_writer.flush()  # another tensorboardX layout, or nothing left to drain
        return
    worker.stop()
    event_file_writer._worker = type(worker)(event_file_writer._event_queue, event_file_writer._ev_writer,
                                             event_file_writer._flush_secs)
    event_file_writer._worker.start()
    event_file_writer.flush()


def discard_events(file_writer: Any) -> None:
    """Make one tensorboardX FileWriter write nothing more, stop its thread and close its file."""
    events_writer = getattr(getattr(file_writer, "event_writer", None), "_ev_writer", None)
    records = getattr(events_writer, "_py_recordio_writer", None)
    if records is None:  # another tensorboardX layout: leave it as it is
        return
    events_writer._py_recordio_writer = _NoRecords()
    event_file_writer = file_writer.event_writer
    worker = getattr(event_file_writer, "_worker", None)
    if worker is not None and worker.is_alive():
        event_file_writer.close()  # stops its thread (its flushes write nothing now)
    else:  # its thread died of the failed write: nothing to stop, and its exit hook must not wait for it
        event_file_writer._closed = True
    with contextlib.suppress(OSError):  # its buffered events cannot be written; the file is closed all the same
        records.close()


class _NoRecords:
    """A tensorboardX record writer that writes nothing (see :func:`discard_events`)."""

    def write(self, data: bytes) -> None:
        """Drop ``data``."""

    def flush(self) -> None:
        """Nothing to flush."""

    def close(self) -> None:
        """Nothing to close."""
