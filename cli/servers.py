"""The server commands: ``imagegen api``, ``worker`` and ``dev``. Each imports the
server it runs (api, worker) when it runs, so that client commands stay light."""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated

import typer
from rich.console import Console

from cli.startup import (
    lock_data_dir_or_exit,
    migrated_or_exit,
    port_free_or_exit,
    registry_or_exit,
    say_if_host_local,
    say_if_storage_is_out,
    upgrade_or_exit,
)

console = Console(stderr=True)


def _serve_api(host: str | None, port: int | None) -> None:
    import uvicorn

    from api.slow_clients import SlowClientGuard
    from shared.core.logs import configure
    from shared.core.settings import get_settings

    registry_or_exit()

    settings = get_settings()
    port_free_or_exit(host or settings.host, port or settings.port)
    configure(settings)  # uvicorn's own loggers too (log_config=None): one format
    say_if_storage_is_out()
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,
        timeout_graceful_shutdown=5,
        http=SlowClientGuard,  # a deadline on each request's headers
    )


def api(
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Run the HTTP API."""
    migrated_or_exit()
    say_if_host_local()
    _serve_api(host, port)


def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues")] = "default,webhooks,batch",
    concurrency: Annotated[int | None, typer.Option(help="Provider calls held at once")] = None,
    sweeper: Annotated[bool, typer.Option(help="Run the lease/outbox sweeper here")] = True,
    device: Annotated[
        str | None, typer.Option(help="Run local models on this device (cuda:1, cpu)")
    ] = None,
    devices: Annotated[
        str | None,
        typer.Option(
            help="One consumer of local models per device, each pinned to it: "
            "all (every GPU of this host) or cuda:0,cuda:2"
        ),
    ] = None,
    gpu_memory_fraction: Annotated[
        float | None,
        typer.Option(
            min=0.01, max=1.0, help="Share of each GPU's memory local models' weights may take"
        ),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve this host's metrics (Prometheus) on this port")
    ] = None,
) -> None:
    """Run a worker: a supervisor whose consumer processes each hold many provider
    calls at once, started again whenever one dies (with the batch queue among
    others, batch lines run in a second consumer at lower priority; the queues of
    local models, `--queues gpu`, in a consumer of their own per device)."""
    from shared.core.settings import get_settings
    from worker.supervisor import resolve_devices, supervise

    if device is not None and devices is not None:
        console.print("[red]--device and --devices: name one[/red]")
        raise typer.Exit(2)
    pinned: list[str] = []
    if devices is not None:
        try:
            pinned = resolve_devices(devices)
        except ValueError as exc:
            console.print(f"[red]--devices: {exc}[/red]")
            raise typer.Exit(2) from None
    # Read by the consumers it starts (a pinned consumer's own IMAGEGEN_DEVICE wins).
    if device is not None:
        os.environ["IMAGEGEN_DEVICE"] = device
    if gpu_memory_fraction is not None:
        os.environ["IMAGEGEN_GPU_MEMORY_FRACTION"] = str(gpu_memory_fraction)
    get_settings.cache_clear()
    local_queues = registry_or_exit().local_queues
    migrated_or_exit()
    say_if_host_local()
    if metrics_port is not None:
        # A worker host's own scrape target (its processes' counters; the work's
        # gauges are the API's /metrics).
        from shared.core.instruments import serve

        serve(metrics_port)
    supervise(get_settings(), queues.split(","), concurrency, sweeper, local_queues, pinned)


def dev(
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
) -> None:
    """API and worker together on embedded defaults (SQLite, local files, no Redis)."""
    from shared.core.db import unit_of_work
    from shared.core.private_files import private_dir, read_private_file
    from shared.core.settings import get_settings
    from shared.projects.service import KEY_PREFIX, ensure_key

    settings = get_settings()
    private_dir(settings.data_dir)  # 0700: it holds the secrets and the database
    lock = lock_data_dir_or_exit(settings.data_dir)  # noqa: F841  (held until exit)
    port_free_or_exit(host or settings.host, port or settings.port)
    upgrade_or_exit()
    key = settings.dev_api_key
    key_file = settings.data_dir / "dev_api_key"
    if not key:
        import secrets

        key = read_private_file(key_file, lambda: KEY_PREFIX + secrets.token_urlsafe(32))
    with unit_of_work() as session:
        ensure_key(session, "default", key)
    from worker.supervisor import WorkerGroup

    # Local models' queues too, each in a consumer of its own (worker/supervisor.py).
    local = sorted(registry_or_exit().local_queues)
    queues = ["default", "webhooks", settings.batch_queue, *local]
    worker_proc = WorkerGroup(settings, queues, local_queues=local)
    url = f"http://{host or settings.host}:{port or settings.port}"
    console.print(f"[bold]imagegen[/bold] dev server on {url}")
    console.print(f"data: {settings.data_dir.resolve()} (IMAGEGEN_DATA_DIR)", highlight=False)
    console.print(f"API key: [bold]{key}[/bold]", soft_wrap=True)
    console.print(
        f'  curl {url}/v1/images/generations -H "Authorization: Bearer {key}" '
        "-H 'Content-Type: application/json' -d '{\"prompt\": \"a red fox\"}'",
        soft_wrap=True,
        highlight=False,
    )
    # uvicorn re-raises the SIGTERM it caught once it has shut down; with the default
    # handler that ends the process before `finally` could stop the worker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        _serve_api(host, port)
    finally:
        worker_proc.stop(timeout=10)
