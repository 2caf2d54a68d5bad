"""Serve's buffered request-path log lines, written to the file in one piece per flush.

Serve gives each replica's ``ray.serve`` logger a ``MemoryHandler`` whose target is the
replica's ``RotatingFileHandler`` (1,000 records in the throughput-optimized mode, 1 otherwise).
The stock flush hands the target one record at a time, and for every record the target stats
the file twice, formats the record twice (once only to measure it for the rollover check),
seeks, writes and flushes. On a router answering cache hits that was more CPU than the rest
of our log line (``benchmarks/results/router_hit_cpu/``).

``BatchedLogWriter.flush`` keeps what reaches the file and when, and does the work once per
batch: each record is filtered by the target and formatted once, the rollover check runs once
for the batch (rolling over first when the batch would take the file past ``maxBytes``, so a
file outgrows the limit only when one batch alone is larger), and the batch is one write and one
flush. Order is kept: the buffer's lock is held while writing, as the stock flush does.

``batch_log_writes()`` swaps each stock ``MemoryHandler`` of the named loggers (target a
``RotatingFileHandler``) for a ``BatchedLogWriter`` with the same capacity, flush level, target,
level, formatter, filters and buffered records. ``SERVE_APP_BATCHED_LOG_WRITES=0`` in a
replica's environment keeps Serve's handler as it is.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
from collections.abc import Iterable

__all__ = ["BatchedLogWriter", "batch_log_writes"]

_LOGGERS = ("", "ray", "ray.serve")
SWITCH_ENV = "SERVE_APP_BATCHED_LOG_WRITES"


class BatchedLogWriter(logging.handlers.MemoryHandler):
    """A ``MemoryHandler`` whose flush writes a ``RotatingFileHandler`` target in one piece
    (any other target gets the stock record-by-record flush). Never raises: a record that
    fails to format is reported through the target's ``handleError`` and skipped."""

    def flush(self) -> None:
        self.acquire()
        try:
            target = self.target
            if target is None or not self.buffer:
                return
            if not isinstance(target, logging.handlers.RotatingFileHandler):
                super().flush()
                return
            records, self.buffer = self.buffer, []
            _write_batch(target, records)
        finally:
            self.release()


def _write_batch(target: logging.handlers.RotatingFileHandler, records: list[logging.LogRecord]) -> None:
    lines: list[str] = []
    for record in records:
        try:
            kept = target.filter(record)
            if not kept:
                continue
            if isinstance(kept, logging.LogRecord):  # Python 3.12+: a filter may replace it
                record = kept
            lines.append(target.format(record) + target.terminator)
        except Exception:  # noqa: BLE001 - one bad record must not lose the batch
            target.handleError(record)
    if not lines:
        return
    text = "".join(lines)
    target.acquire()
    try:
        if target.stream is None:  # delay=True, or after a failed rollover
            target.stream = target._open()
        # As the stock check: only a regular file rolls over (bpo-45401).
        if target.maxBytes > 0 and os.path.isfile(target.baseFilename):
            target.stream.seek(0, 2)
            size = target.stream.tell()
            if size > 0 and size + len(text) >= target.maxBytes:
                target.doRollover()
        target.stream.write(text)
        target.stream.flush()
    except Exception:  # noqa: BLE001 - logging never fails the replica
        target.handleError(records[-1])
    finally:
        target.release()


def batch_log_writes(names: Iterable[str] = _LOGGERS) -> int:
    """Swap every stock ``MemoryHandler`` (target a ``RotatingFileHandler``) of the named
    loggers for a ``BatchedLogWriter``; returns how many were swapped (0 when
    ``SERVE_APP_BATCHED_LOG_WRITES=0``)."""
    if os.environ.get(SWITCH_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return 0
    swapped = 0
    for name in names:
        log = logging.getLogger(name)
        for old in list(log.handlers):
            if type(old) is not logging.handlers.MemoryHandler:
                continue
            if not isinstance(old.target, logging.handlers.RotatingFileHandler):
                continue
            new = BatchedLogWriter(old.capacity, old.flushLevel, old.target, old.flushOnClose)
            new.setLevel(old.level)
            new.setFormatter(old.formatter)  # type: ignore[arg-type]
            for f in old.filters:
                new.addFilter(f)
            old.acquire()
            try:
                new.buffer, old.buffer = old.buffer, []
                log.addHandler(new)
                log.removeHandler(old)
            finally:
                old.release()
            swapped += 1
    return swapped
