"""A TCP relay that adds a round-trip time, in user space: a network link for benchmarks on one
machine (this VM's kernel has no netem qdisc).

    python -m benchmarks.delay_relay --listen 50060 --to 127.0.0.1:50051 --rtt-ms 20

Every chunk read in either direction is written on rtt/2 after it was read, in order. Reading
never waits for the delay (each direction has its own queue of timestamped chunks), so the link
has latency but no bandwidth limit: a burst of messages takes one RTT, not one per message, as on
a real link. An end of stream is passed on (as a half-close) after the same delay; an error on
either side closes both.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import threading

CHUNK_BYTES = 64 * 1024


class DelayRelay:
    """Forwards each accepted connection to target_host:target_port, every byte held rtt_s/2 each
    way. It runs on its own thread and event loop, so a synchronous benchmark (or a gRPC client in
    the same process) can use it; `rtt_s` may be changed while it runs (chunks read after the
    change get the new delay; open connections stay open)."""

    def __init__(
        self,
        listen_port: int,
        target_host: str,
        target_port: int,
        rtt_s: float,
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.listen_host, self.listen_port = listen_host, listen_port
        self.target_host, self.target_port = target_host, target_port
        self.rtt_s = rtt_s
        self.port: int | None = None  # the bound port, once started
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._connections: set[asyncio.Task] = set()

    def start(self) -> int:
        """Listen (port 0: a free one) and return the bound port."""
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve(ready)), name="delay-relay", daemon=True
        )
        self._thread.start()
        self.port = ready.result(timeout=10)
        return self.port

    def stop(self) -> None:
        """Close the listener and every relayed connection (a no-op when not running)."""
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)
        self._thread = self._loop = self._stopping = None

    def __enter__(self) -> DelayRelay:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _serve(self, ready: concurrent.futures.Future[int]) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        try:
            server = await asyncio.start_server(self._relay, self.listen_host, self.listen_port)
        except OSError as exc:
            ready.set_exception(exc)
            return
        ready.set_result(server.sockets[0].getsockname()[1])
        await self._stopping.wait()
        server.close()  # not wait_closed(): it would wait for the connections cancelled next
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        writers = [client_writer]
        try:
            target_reader, target_writer = await asyncio.open_connection(self.target_host, self.target_port)
            writers.append(target_writer)
            async with asyncio.TaskGroup() as group:  # an error in one direction cancels the other
                group.create_task(self._pipe(client_reader, target_writer))
                group.create_task(self._pipe(target_reader, client_writer))
        except Exception:  # a side went away or failed: close both (other connections go on)
            pass
        finally:
            for writer in writers:
                writer.close()
            self._connections.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction: a reader that only timestamps and queues, a writer that waits out each
        chunk's delay (due = read time + rtt/2, so queued chunks' delays overlap, not add up)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            while True:
                try:
                    data = await reader.read(CHUNK_BYTES)
                except OSError:
                    data = b""
                queue.put_nowait((loop.time() + self.rtt_s / 2, data))
                if not data:
                    return

        reading = asyncio.create_task(read())
        try:
            while True:
                due, data = await queue.get()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if not data:  # end of stream: pass the half-close on
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        finally:
            reading.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", type=int, default=0, help="port to listen on (0: a free one)")
    parser.add_argument("--to", required=True, help="host:port to forward to")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round-trip time to add")
    args = parser.parse_args(argv)
    host, port = args.to.rsplit(":", 1)
    relay = DelayRelay(args.listen, host, int(port), args.rtt_ms / 1000)
    print(
        f"relaying 127.0.0.1:{relay.start()} -> {args.to} with {args.rtt_ms:g} ms RTT (Ctrl-C stops)",
        flush=True,
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        relay.stop()


if __name__ == "__main__":
    main()
