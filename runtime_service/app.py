"""Wires the runtime's parts together: database, storage, agents, hub, runner, use cases."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from runtime_service.agents.registry import AgentRegistry
from runtime_service.config import RuntimeConfig, advertised_address
from runtime_service.database import Database, create_db_engine
from runtime_service.direct_stops import DirectStops
from runtime_service.hub import EventHub
from runtime_service.metrics import RuntimeMetrics
from runtime_service.migrate import upgrade_to_head
from runtime_service.notifications import Handlers, PostgresListener
from runtime_service.operations import OperationsService
from runtime_service.retention import RetentionSweeper
from runtime_service.runner import Runner, RunnerSettings
from runtime_service.step_events import DeltaSettings
from runtime_service.storage import PostgresStorage, Storage, open_storage
from runtime_service.tools import ToolRegistry
from runtime_service.tools.toolbox import ToolBox
from stopline.transport import ClientTLS


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
    direct: DirectStops | None = None

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

        if isinstance(storage, PostgresStorage):
            listener = PostgresListener(
                config.database_url,
                Handlers(
                    on_stop=runner.stop_notified,
                    on_event=hub.poke,
                    on_work=runner.wake,
                    on_reconnect=recheck_everything,
                ),
            )
            listener.start()
            # Stops recorded here for another replica's operation also go straight to it.
            operations.direct = DirectStops(
                storage, config.runner_id, meters, *_peer_credentials(config)
            )
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
        direct = operations.direct
        return cls(config, storage, hub, runner, operations, toolbox, listener, retention, direct)

    def advertise(self, listen: str, port: int) -> str | None:
        """Once serving on `port`: register where other replicas send this one their stops
        (nothing on SQLite, one replica, or with --advertise-address off)."""
        address = advertised_address(listen, port, self.config.advertise_address)
        if self.direct is not None and address is not None:
            self.direct.start(address)
            return address
        return None

    async def close(self) -> None:
        if self.retention is not None:
            await self.retention.close()
        await self.runner.shutdown()
        if self.direct is not None:
            await self.direct.close()
        await self.tools.close()
        if self.listener is not None:
            await self.listener.close()
        await self.storage.close()


def _peer_credentials(config: RuntimeConfig) -> tuple[str | None, ClientTLS | None]:
    """How this replica calls the others: with the service credential it accepts (replicas
    share it) and, when it serves TLS, over TLS presenting its own certificate, checked
    against its client CA (the system roots without one)."""
    token = config.service_tokens[0] if config.service_tokens else None
    tls = config.tls
    if tls is None:
        return token, None
    return token, ClientTLS(tls.client_ca_file, tls.cert_file, tls.key_file)
