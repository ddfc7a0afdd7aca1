"""R_listen: plain asyncio + asyncpg receiving notifications and doing nothing else.

Run as its own process (it must never import trio_asyncio, which would swap asyncio's event-loop
policy): ``python benchmarks/listen_baseline.py DSN EXPECTED CHANNEL,CHANNEL,...``.
It LISTENs, prints ``{"ready": true}``, then counts notifications (callback -> asyncio.Queue ->
consumer task, the shape of the daemon's listener) until EXPECTED arrived or nothing came for
10 s, and prints one JSON line: received, monotonic times of the first and last one, CPU seconds.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

import asyncpg


async def main(dsn: str, expected: int, channels: list[str]) -> dict[str, object]:
    conn = await asyncpg.connect(dsn)
    queue: asyncio.Queue[object] = asyncio.Queue()

    def on_notify(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        queue.put_nowait(payload)

    for ch in channels:
        await conn.add_listener(ch, on_notify)
    print(json.dumps({"ready": True}), flush=True)
    state: dict[str, float | int | None] = {"received": 0, "first": None, "last": None, "cpu0": 0.0}

    async def consume() -> None:
        received = 0
        while received < expected:
            await queue.get()
            received += 1
            state["received"] = received
            state["last"] = time.monotonic()
            if received == 1:
                state["first"], state["cpu0"] = state["last"], time.process_time()

    consumer = asyncio.ensure_future(consume())
    try:
        seen, quiet = 0, 0.0
        while not consumer.done():
            await asyncio.wait([consumer], timeout=0.5)
            n = state["received"]
            quiet = 0.0 if n != seen else quiet + 0.5
            seen = int(n or 0)
            if quiet >= (10 if seen else 60):
                consumer.cancel()
                break
    finally:
        await conn.close()
    received, first, last = state["received"], state["first"], state["last"]
    cpu0 = float(state["cpu0"] or 0.0)
    return {
        "received": received,
        "first": first,
        "last": last,
        "cpu_s": time.process_time() - cpu0,
        "imported_trio_asyncio": "trio_asyncio" in sys.modules,
    }


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    result = asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")))
    print(json.dumps(result), flush=True)
