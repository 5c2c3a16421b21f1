"""``python -m worker``: one consumer process (``imagegen worker`` supervises these)."""

from __future__ import annotations

import argparse

from shared.core.redact import install
from worker.main import run_consumer

install()  # before anything logs: no secret in any line of this process

parser = argparse.ArgumentParser(prog="python -m worker")
parser.add_argument("--queues", default="default,webhooks,batch")
parser.add_argument("--concurrency", type=int, default=None)
parser.add_argument("--no-sweeper", dest="sweeper", action="store_false")
args = parser.parse_args()
run_consumer(args.queues.split(","), args.concurrency, sweeper=args.sweeper)
