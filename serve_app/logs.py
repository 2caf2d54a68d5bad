"""One structured log line per prediction, and a filter that keeps secrets out of every line.

- ``log_prediction(**fields)`` logs ``"prediction"`` through Serve's ``ray.serve`` logger with
  the fields as ``extra``: with ``logging_config: {encoding: JSON}`` they become top-level JSON
  keys next to Serve's own (``request_id``, ``deployment``, ``replica``, ...). Serve's TEXT
  format prints only the message and the request id, so a replica logging TEXT gets
  ``PredictionText``, which writes the fields into the message as ``key=value`` pairs
  (``prediction model=qa variant=default cache=HIT-MEMORY outcome=ok latency_ms=0.4 ...``).
- ``SecretMask`` masks, in the message, its arguments, extra fields and exception text, the
  literal values of configured secrets (API keys, Redis URLs read from the environment) and
  anything shaped like a provider key or an Authorization value. ``install_secret_mask``
  attaches it to the handlers of the root, ``ray`` and ``ray.serve`` loggers, so it applies to
  library lines too. Logging never fails a request: a masking error drops nothing and raises
  nothing.
- ``LogFlusher`` bounds how late a line reaches the log file. Serve's throughput-optimized mode
  buffers a replica's request-path lines in a ``MemoryHandler`` (1,000 records) that flushes only
  when full or on an ERROR: on a quiet replica a prediction's line could wait indefinitely.
  The flusher, a daemon thread each replica starts, flushes every buffering handler of those
  loggers each ``interval_s`` (1 s): writes stay batched, and a line is at most ~1 s late.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import threading
from collections.abc import Iterable
from typing import Any

from .log_writer import batch_log_writes

__all__ = ["LogFlusher", "PredictionText", "SecretMask", "flush_buffered_logs", "install_prediction_text",
           "install_secret_mask", "log_prediction", "mask", "setup_replica_logging"]

logger = logging.getLogger("ray.serve")

MASK = "***"
_PATTERNS = [
    re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"),  # OpenAI-style keys
    re.compile(r"\b(?:Bearer|Basic)\s+[A-Za-z0-9._~+/=\-]{8,}", re.IGNORECASE),
    re.compile(r"(?i)\b(api[_-]?key|authorization|x-api-key|password|secret|token)(\"?\s*[:=]\s*\"?)([^\s\"',;}]{4,})"),
    re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]*://[^\s:/@]*:)([^\s@/]+)(@)"),  # user:password@ in URLs
]
# What every pattern above needs to match, in one scan: a line with none of these (most lines:
# access logs, prediction records) skips the four substitutions. The scan is case-sensitive over
# the case-folded text: an IGNORECASE alternation cost ~8x more per line, on every line.
_TRIGGER = re.compile(r"sk-|bearer|basic|api[_-]?key|authorization|password|secret|token|://")
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _triggered(text: str) -> bool:
    return _TRIGGER.search(text.casefold()) is not None


def mask(text: str, literals: Iterable[str] = ()) -> str:
    for secret in literals:
        if secret and secret in text:
            text = text.replace(secret, MASK)
    if not _triggered(text):
        return text
    text = _PATTERNS[0].sub(MASK, text)
    text = _PATTERNS[1].sub(MASK, text)
    text = _PATTERNS[2].sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    text = _PATTERNS[3].sub(lambda m: f"{m.group(1)}{MASK}{m.group(3)}", text)
    return text


class SecretMask(logging.Filter):
    def __init__(self, literals: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is masked whole.
        self._literals = sorted({s for s in literals if s and len(s) >= 4}, key=len, reverse=True)

    def _clean(self, text: str) -> bool:
        """Whether ``mask`` would leave ``text`` as it is: no literal, no pattern trigger."""
        return not _triggered(text) and not any(secret in text for secret in self._literals)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            fields = record.__dict__
            extras = [(k, v) for k in fields.keys() - _STANDARD if isinstance(v := fields[k], str)]
            # One scan over the message and every string extra together: most lines (Serve's
            # access log, our prediction records) carry nothing to mask, and then no field is
            # scanned on its own. A match anywhere masks field by field, as before.
            if self._clean("\n".join([message, *(v for _, v in extras)])):
                record.msg = message
            else:
                record.msg = mask(message, self._literals)
                for key, value in extras:
                    setattr(record, key, mask(value, self._literals))
            record.args = None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = mask(record.exc_text, self._literals)
        except Exception:  # noqa: BLE001 - never lose or break a log line over masking
            pass
        return True


def install_secret_mask(literals: Iterable[str]) -> SecretMask:
    """Attach one ``SecretMask`` to every handler of the root, ``ray`` and ``ray.serve``
    loggers (idempotent: an earlier mask of ours is replaced)."""
    mask_filter = SecretMask(literals)
    for name in ("", "ray", "ray.serve"):
        for handler in logging.getLogger(name).handlers:
            for old in [f for f in handler.filters if isinstance(f, SecretMask)]:
                handler.removeFilter(old)
            handler.addFilter(mask_filter)
    return mask_filter


# The prediction line's fields in the order TEXT lines show them (request_id is Serve's own).
TEXT_FIELDS = ("model", "variant", "served_by", "cache", "outcome", "error_code", "latency_ms", "input_tokens",
               "output_tokens", "cost_usd", "api_key")
# ``api_key`` holds the key's id, never the key: shown as ``key_id``, because ``api_key=...`` is
# what the secret mask masks in any line.
_TEXT_LABELS = {"api_key": "key_id"}


class PredictionText(logging.Filter):
    """For a handler whose format shows only the message (Serve's TEXT encoding): writes a
    prediction record's fields into its message as ``key=value`` pairs, in ``TEXT_FIELDS``
    order, absent ones left out. Other records pass unchanged; it never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "prediction" and record.funcName == "log_prediction":
            fields = record.__dict__
            record.msg = " ".join(["prediction", *(f"{_TEXT_LABELS.get(k, k)}={fields[k]}"
                                                   for k in TEXT_FIELDS if k in fields)])
        return True


def _shows_only_the_message(handler: logging.Handler) -> bool:
    """Whether ``handler`` (or the handler a buffer writes to) formats with Serve's TEXT
    formatter, which leaves a record's extra fields out."""
    try:
        from ray.serve._private.logging_utils import ServeFormatter
    except ImportError:  # Serve's layout changed: lines stay as they are
        return False
    target = getattr(handler, "target", None) or handler
    return isinstance(target.formatter, ServeFormatter)


def install_prediction_text(names: Iterable[str] = ("ray.serve",)) -> int:
    """Attach one ``PredictionText`` to each TEXT-formatting handler of the named loggers
    (idempotent); returns how many handlers have it."""
    text = PredictionText()
    count = 0
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if not _shows_only_the_message(handler):
                continue
            for old in [f for f in handler.filters if isinstance(f, PredictionText)]:
                handler.removeFilter(old)
            handler.addFilter(text)
            count += 1
    return count


_LOGGERS = ("", "ray", "ray.serve")


def flush_buffered_logs(names: Iterable[str] = _LOGGERS) -> int:
    """Flush every buffering handler (``logging.handlers.BufferingHandler``, Serve's
    ``MemoryHandler`` included) of the named loggers; returns how many were flushed. Never
    raises: a handler that fails to flush is skipped (its records stay buffered)."""
    flushed = 0
    for name in names:
        for handler in list(logging.getLogger(name).handlers):
            if isinstance(handler, logging.handlers.BufferingHandler):
                try:
                    handler.flush()
                    flushed += 1
                except Exception:  # noqa: BLE001 - a log flush never breaks the replica
                    pass
    return flushed


class LogFlusher:
    """A daemon thread calling ``flush_buffered_logs`` every ``interval_s`` until ``stop()``
    (and once more then). One per replica, owned by its deployment."""

    def __init__(self, interval_s: float = 1.0, names: Iterable[str] = _LOGGERS) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self._interval_s = interval_s
        self._names = tuple(names)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serve-app-log-flush", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            flush_buffered_logs(self._names)
        flush_buffered_logs(self._names)

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)


def setup_replica_logging(secret_literals: Iterable[str]) -> LogFlusher:
    """What every replica does first: write Serve's buffered lines a batch at a time
    (``serve_app.log_writer``), show the prediction fields in TEXT lines, mask its secrets in
    every log line (the mask goes last, so it sees the finished text), and bound how late a
    buffered line is written (the returned flusher runs for the replica's life)."""
    batch_log_writes()
    install_prediction_text()
    install_secret_mask(secret_literals)
    return LogFlusher()


def log_prediction(**fields: Any) -> None:
    """``"prediction"`` with ``fields`` as structured extras (never raises).

    The record is made here rather than by ``logger.info``, which walks the stack for the
    caller on every call: the caller is always this function, so its file and line are
    known (one line per prediction made that walk a visible cost on the hit path)."""
    try:
        if logger.isEnabledFor(logging.INFO):
            record = logger.makeRecord(logger.name, logging.INFO, __file__, _LOG_LINE, "prediction", (), None,
                                       func="log_prediction",
                                       extra={k: v for k, v in fields.items() if v is not None})
            logger.handle(record)
    except Exception:  # noqa: BLE001 - logging never fails a request
        pass


_LOG_LINE = log_prediction.__code__.co_firstlineno
