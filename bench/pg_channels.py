"""What a PostgreSQL listener's server process pays per notification for the channels it listens
on: PostgreSQL checks every notification sent in the database against each channel a listener
has, one by one, whether or not the notification is for it. The probe behind the 256 events
channels of runtime_service/notifications.py (a channel per operation made a replica watching
thousands of operations cost more than it saved).

    python -m bench.pg_channels [--notifications 20000]

For each count of channels, one connection LISTENs on that many channels none of the
notifications is sent on, another sends the notifications (100 per transaction), and the
listening server process's CPU time is read from /proc (psutil) once it has caught up.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

from bench.stack import ADMIN_URL
from runtime_service.notifications import libpq_url

CHANNEL_COUNTS = (1, 256, 1_000, 10_000)


def measure(notifications: int) -> dict[str, float]:
    """Microseconds of the listener's server process per notification, by channel count, in a
    database of its own (created and dropped here)."""
    import psycopg

    admin_url = libpq_url(ADMIN_URL)
    name = f"stopline_pg_channels_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        return {
            str(count): _per_notification(admin_url, name, count, notifications)
            for count in CHANNEL_COUNTS
        }
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _per_notification(admin_url: str, name: str, channels: int, notifications: int) -> float:
    import psutil  # bench extra only
    import psycopg

    listener: Any = psycopg.connect(admin_url, dbname=name, autocommit=True)
    sender: Any = psycopg.connect(admin_url, dbname=name, autocommit=True)
    try:
        server = psutil.Process(listener.execute("SELECT pg_backend_pid()").fetchone()[0])
        names = [f"probe_{uuid.uuid4()}" for _ in range(channels)]
        for i in range(0, channels, 500):
            listener.execute("; ".join(f'LISTEN "{n}"' for n in names[i : i + 500]))
        before = server.cpu_times()
        for _ in range(notifications // 100):
            sender.execute(
                "SELECT pg_notify('elsewhere_' || g::text, 'x') FROM generate_series(1, 100) g"
            )
        # The listener's server process reads the queue when signalled; let it catch up.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            list(listener.notifies(timeout=0.2))
        after = server.cpu_times()
        spent = float(after.user + after.system - before.user - before.system)
        return 1e6 * spent / notifications
    finally:
        listener.close()
        sender.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--notifications", type=int, default=20_000)
    args = parser.parse_args()
    result = measure(args.notifications)
    print(json.dumps({"us_per_notification_by_channels": result}, indent=1))


if __name__ == "__main__":
    main()
