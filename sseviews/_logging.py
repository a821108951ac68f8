"""How sseviews' warnings and errors show when the app has configured no logging.

Python prints a record that no handler takes through `logging.lastResort`: on
stderr, WARNING and above, but as the bare message, so `events() raised` and its
traceback would come without a level or a logger name. Under uvicorn that is the
usual case: uvicorn configures its own loggers, not the root one.

`FallbackHandler` on the `sseviews` logger does what `lastResort` does, in
`logging.BASIC_FORMAT` (`ERROR:sseviews:...`), and only then: as soon as a
handler elsewhere would take the record (`logging.basicConfig()`, `dictConfig`,
pytest's capture, a handler on `sseviews` itself), it stays silent and the app's
handlers alone print it. Records still propagate to the root logger as usual.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["FallbackHandler", "install_fallback", "printable"]


class FallbackHandler(logging.Handler):
    """Print what no other handler would take, like `logging.lastResort`, with its level."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter(logging.BASIC_FORMAT))

    def handle(self, record: logging.LogRecord) -> bool:
        last_resort = logging.lastResort
        if last_resort is None or record.levelno < last_resort.level:
            return False  # the app turned the last resort off (or up)
        if self._handled_elsewhere(record):
            return False
        return bool(super().handle(record))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr  # looked up each time, as lastResort does
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)

    def _handled_elsewhere(self, record: logging.LogRecord) -> bool:
        """Whether the record meets another handler on its way up (as callHandlers walks)."""
        current: logging.Logger | None = logging.getLogger(record.name)
        while current is not None:
            if any(handler is not self for handler in current.handlers):
                return True
            if not current.propagate:
                return False
            current = current.parent
        return False


def install_fallback() -> None:
    """Add a `FallbackHandler` to the `sseviews` logger, once."""
    logger = logging.getLogger("sseviews")
    if not any(isinstance(handler, FallbackHandler) for handler in logger.handlers):
        logger.addHandler(FallbackHandler())


def printable(text: str) -> str:
    """Escape what would break a log line: request text may hold CR, LF, NEL, ..."""
    if text.isprintable():
        return text or "(empty)"
    return text.encode("unicode_escape").decode("ascii")
