"""Flower ServerApp: read the run config once, hand the rounds to ``server.workflow``."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.workflow import run_federation
from shared.config import RunConfig

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flat(context.run_config)
    run_federation(grid, cfg, resume=cfg.resume)
