"""Entry points: python -m pipelines.NAME.

Each entry point calls ``quiet_beam_import()`` first when run as a program, before it imports Beam."""

import logging

APITOOLS_WARNING = "apitools not found, and bigquery client libraries are not available"


class DropWarning(logging.Filter):
    """Drops the records of a logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def drop_warning(logger: str, prefix: str) -> None:
    """Drop, from now on, the messages starting with ``prefix`` that ``logger`` logs itself (a filter on a
    logger does not see its children's records); once, however often it is called."""
    target = logging.getLogger(logger)
    if not any(isinstance(f, DropWarning) and f.prefix == prefix for f in target.filters):
        target.addFilter(DropWarning(prefix))


def quiet_beam_import() -> None:
    """Drop the warning that importing Beam logs (on the root logger) when its optional BigQuery client,
    apitools, is absent: it concerns BigQuery IO, which no pipeline here uses."""
    drop_warning("", APITOOLS_WARNING)
