"""Entry points: python -m pipelines.NAME.

Each entry point calls ``quiet_beam_import()`` first when run as a program, before it imports Beam."""

import logging

APITOOLS_WARNING = "apitools not found, and bigquery client libraries are not available"


class _DropApitoolsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(APITOOLS_WARNING)


def quiet_beam_import() -> None:
    """Drop the warning that importing Beam logs (on the root logger) when its optional BigQuery client,
    apitools, is absent: it concerns BigQuery IO, which no pipeline here uses."""
    root = logging.getLogger()
    if not any(isinstance(f, _DropApitoolsWarning) for f in root.filters):
        root.addFilter(_DropApitoolsWarning())
