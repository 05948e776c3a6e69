"""Wires the runtime's parts together: database, store, agents, hub, runner, use cases."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from runtime_service.agents.registry import AgentRegistry
from runtime_service.config import RuntimeConfig
from runtime_service.database import Database, create_db_engine
from runtime_service.hub import EventHub
from runtime_service.migrate import upgrade_to_head
from runtime_service.operations import OperationsService
from runtime_service.runner import Runner
from runtime_service.store import OperationStore


@dataclass
class RuntimeApp:
    config: RuntimeConfig
    db: Database
    store: OperationStore
    hub: EventHub
    runner: Runner
    operations: OperationsService

    @classmethod
    async def open(cls, config: RuntimeConfig, agents: AgentRegistry | None = None) -> RuntimeApp:
        """Connect, migrate, and resume what a previous process left unfinished."""
        registry = agents if agents is not None else AgentRegistry.load(config.agents)
        engine = create_db_engine(config.database_url)
        if config.migrate:
            await asyncio.to_thread(upgrade_to_head, engine)
        db = Database(engine)
        store = OperationStore(engine)
        hub = EventHub()
        runner = Runner(
            db,
            store,
            registry,
            hub,
            config.runner_id,
            stop_grace=config.stop_grace_seconds,
            max_running=config.max_running,
        )
        operations = OperationsService(config, db, store, registry, hub, runner)
        app = cls(config, db, store, hub, runner, operations)
        await runner.resume_unfinished()
        return app

    async def close(self) -> None:
        await self.runner.shutdown()
        await asyncio.to_thread(self.db.close)
