"""Prometheus metrics (prometheus-client).

Counters and histograms are written by the process where things happen: request
latency by the API, provider calls, storage writes and finished jobs by workers,
webhook deliveries by the webhooks worker. Each process writes them to files in
``IMAGEGEN_METRICS_DIR`` (prometheus-client's multiprocess mode; ``enable`` points
``PROMETHEUS_MULTIPROC_DIR`` there before the library is imported), so one scrape
sums every process of the host: the API's ``/metrics``, or a worker host's
``imagegen worker --metrics-port``. Gauges of the work itself (jobs by status and
model, queue depth, batch progress) are read from SQL at scrape time: every API
process reports the same figures, wherever the workers run.
"""

from __future__ import annotations

import os
from pathlib import Path

# prometheus_client chooses how values are stored when it is imported: ``enable``
# must run before anything imports this module's metrics (the CLI's entry point and
# ``python -m worker`` call it first).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable(folder: Path) -> None:
    """Write this process's metrics (and its children's) to files in ``folder``
    (made by the first process that records one: a CLI command that records
    nothing leaves no folder behind)."""
    os.environ.setdefault(MULTIPROC_ENV, str(folder.resolve()))
