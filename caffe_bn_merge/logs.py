"""The library's warnings kept as well as logged, so reports can list them: `collected()` gathers
each distinct warning the `caffe_bn_merge` loggers emit while it is open (and, being a handler,
keeps Python's last-resort handler from printing them where nothing else shows them)."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager

LOGGER = "caffe_bn_merge"


class Collector(logging.Handler):
    """Keeps the text of each distinct warning (or worse) in the order first seen."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text not in self.texts:
            self.texts.append(text)


@contextmanager
def collected(logger: str = LOGGER) -> Iterator[list[str]]:
    """The distinct warnings logged under `logger` while open (the list fills as they come)."""
    collector = Collector()
    target = logging.getLogger(logger)
    target.addHandler(collector)
    try:
        yield collector.texts
    finally:
        target.removeHandler(collector)
