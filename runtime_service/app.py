"""Wires the runtime's parts together: database, storage, agents, hub, runner, use cases."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from runtime_service.agents.registry import AgentRegistry
from runtime_service.config import RuntimeConfig
from runtime_service.database import Database, create_db_engine
from runtime_service.hub import EventHub
from runtime_service.metrics import RuntimeMetrics
from runtime_service.migrate import upgrade_to_head
from runtime_service.notifications import Handlers, PostgresListener, parse_stop_payload
from runtime_service.operations import OperationsService
from runtime_service.retention import RetentionSweeper
from runtime_service.runner import Runner, RunnerSettings
from runtime_service.step_events import DeltaSettings
from runtime_service.storage import PostgresStorage, Storage, open_storage
from runtime_service.tools import ToolRegistry
from runtime_service.tools.toolbox import ToolBox


@dataclass
class RuntimeApp:
    config: RuntimeConfig
    storage: Storage
    hub: EventHub
    runner: Runner
    operations: OperationsService
    tools: ToolBox
    listener: PostgresListener | None = None
    retention: RetentionSweeper | None = None

    @classmethod
    async def open(
        cls,
        config: RuntimeConfig,
        agents: AgentRegistry | None = None,
        tools: ToolRegistry | None = None,
    ) -> RuntimeApp:
        """Connect, migrate, and resume what a previous process left unfinished."""
        if tools is None:
            tools = ToolRegistry.load(
                config.tools, python_max_seconds=config.python_tool_max_seconds
            )
        known_tools = tools
        registry = (
            agents
            if agents is not None
            else AgentRegistry.load(
                config.agents, llm=config.llm, tool_names=lambda: known_tools.names
            )
        )
        toolbox = ToolBox(
            tools,
            pool_size=config.worker_pool_size,
            max_workers=config.max_workers,
            stop_grace=config.stop_grace_seconds,
        )
        engine = create_db_engine(config.database_url, config.db_busy_timeout_seconds)
        if config.migrate:
            await asyncio.to_thread(upgrade_to_head, engine)
        db = Database(engine)
        hub = EventHub()
        settings = RunnerSettings(
            runner_id=config.runner_id,
            stop_grace=config.stop_grace_seconds,
            max_running=config.max_running,
            lease_seconds=config.lease_seconds,
            poll_seconds=config.poll_seconds,
            abort_mid_step=config.abort_mid_step,
            deltas=DeltaSettings(config.delta_flush_seconds, config.delta_flush_chars),
            input_expiry_seconds=config.input_expiry_seconds,
        )
        # The one place that looks at the database's dialect: storage is chosen here, and with
        # it how replicas hear of each other (PostgreSQL notifications) or that there are none.
        meters = RuntimeMetrics()
        storage: Storage = open_storage(db, config.database_url, meters.storage)
        runner = Runner(storage, registry, hub, settings, toolbox, meters)
        operations = OperationsService(config, storage, registry, hub, runner)
        listener = None

        def recheck_everything() -> None:
            runner.wake()
            runner.check_stops_now()
            hub.poke_all()

        def stop_heard(payload: str) -> None:
            # The runner's watchers here need the stop's event before its halt's, which the
            # runner publishes here: this replica may not listen on the events channel.
            operation_id, event = parse_stop_payload(payload)
            if event is not None:
                hub.notified(event.operation_id, event.seq, event)
            runner.stop_notified(operation_id)

        def listening(operation_id: str) -> None:
            # Its events stored elsewhere before the channel was listened on may have gone
            # unheard: its watchers look in storage. One this runner runs, it publishes here.
            if not runner.runs(operation_id):
                hub.poke(operation_id)

        if isinstance(storage, PostgresStorage):
            listener = PostgresListener(
                config.database_url,
                Handlers(
                    on_stop=stop_heard,
                    on_event=hub.notified,
                    on_work=runner.wake,
                    on_reconnect=recheck_everything,
                    on_listening=listening,
                    on_heard=lambda channel: meters.notifications_heard[channel].inc(),
                ),
            )
            hub.tell_watches(listener.watch, listener.unwatch)
            runner.tell_runs(listener.owned)
            listener.start()
        else:
            # SQLite serves one replica: whatever ran these operations before is gone, so resume
            # them now instead of waiting for their leases to lapse.
            await storage.expire_all_leases()
        runner.start()
        retention = RetentionSweeper(
            storage,
            config.event_retention_seconds,
            config.retention_batch_size,
            config.retention_interval_seconds,
            runner.metrics.retention,
        )
        retention.start()
        return cls(config, storage, hub, runner, operations, toolbox, listener, retention)

    async def close(self) -> None:
        if self.retention is not None:
            await self.retention.close()
        await self.runner.shutdown()
        await self.operations.agents.aclose()
        await self.tools.close()
        if self.listener is not None:
            await self.listener.close()
        await self.storage.close()
