"""The request-head deadline of `isl serve` (service/server.py), against a real server process: slow or silent
connections (slowloris) are closed within ISL_HEADER_TIMEOUT_S while the API keeps answering, and keep-alive still
works. Plain uvicorn fails these: it holds such connections for ever and idle keep-alive ones for 5 s."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit import _answers, private_redis
from worker.localstack import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 2.0  # ISL_HEADER_TIMEOUT_S of the server under test
SLACK = 2.0  # every slow connection must be closed within TIMEOUT + SLACK of its opening
PARTIAL_HEAD = b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n"
pytestmark = [pytest.mark.redis, pytest.mark.subprocess]  # `isl serve` and its Redis, for every test


@pytest.fixture(scope="module")
def port(tmp_path_factory) -> Iterator[int]:
    """`isl serve` on a free port with a private Redis, development keys and no models."""
    folder = tmp_path_factory.mktemp("timeouts")
    (folder / "models").mkdir()
    with private_redis(folder) as redis_url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ISL_")}
        env.update(ISL_DEV_MODE="1", ISL_REDIS_URL=redis_url, ISL_STORAGE_ROOT=str(folder / "storage"),
                   ISL_MODELS_DIR=str(folder / "models"), ISL_HEADER_TIMEOUT_S=str(TIMEOUT))
        api_port = free_port()
        with open(folder / "api.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "serve", "--port", str(api_port)], cwd=ROOT,
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: proc.poll() is None and _answers(f"http://127.0.0.1:{api_port}/healthz"), 60, "the API")
            yield api_port
            assert proc.poll() is None, (folder / "api.log").read_text()[-3000:]
        finally:
            proc.terminate()
            proc.wait(20)


async def _until_closed(port: int, trickle: bool) -> tuple[float, bytes]:
    """Opens a connection, sends a partial head and then a header byte every 0.5 s (or nothing), and reads until the
    server closes; returns the seconds from opening to close (inf if it did not close in time) and what was read."""
    t0 = time.monotonic()  # before connecting: the server's clock starts later, at its accept
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def drip() -> None:
        writer.write(PARTIAL_HEAD)
        for byte in b"X-Slow: " + b"a" * 100:
            await asyncio.sleep(0.5)
            writer.write(bytes([byte]))

    dripping = asyncio.create_task(drip()) if trickle else None
    try:
        answer = await asyncio.wait_for(reader.read(), TIMEOUT + SLACK + 2)
        return time.monotonic() - t0, answer
    except (TimeoutError, ConnectionError):
        return float("inf"), b""
    finally:
        if dripping is not None:
            dripping.cancel()
        writer.close()


async def _healthz(port: int) -> tuple[float, bytes]:
    """A fresh connection's GET /healthz: seconds to the whole answer, and its status line."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return time.monotonic() - t0, answer.split(b"\r\n", 1)[0]


async def _attack(port: int, n_partial: int, n_silent: int) -> tuple[list, list, list]:
    attackers = [asyncio.create_task(_until_closed(port, trickle=i < n_partial)) for i in range(n_partial + n_silent)]
    probes = []
    while not all(a.done() for a in attackers):
        await asyncio.sleep(0.2)
        probes.append(await _healthz(port))
    results = [a.result() for a in attackers]
    return results[:n_partial], results[n_partial:], probes


def test_slow_and_silent_heads_are_closed_while_the_api_answers(port):
    partial, silent, probes = asyncio.run(_attack(port, 300, 50))
    worst = max(t for t, _ in partial + silent)
    print(f"\n350 slow connections: closed after {min(t for t, _ in partial + silent):.2f}-{worst:.2f} s; "
          f"{len(probes)} /healthz during the attack, slowest {max(t for t, _ in probes) * 1000:.0f} ms")
    assert worst <= TIMEOUT + SLACK, f"a slow connection was held {worst:.2f} s (deadline {TIMEOUT} s)"
    assert min(t for t, _ in partial + silent) >= TIMEOUT - 0.1, "closed before the deadline"
    assert all(answer.startswith(b"HTTP/1.1 408 ") for _, answer in partial), {a[:40] for _, a in partial}
    assert all(b"connection: close" in answer.lower() for _, answer in partial)
    assert all(answer == b"" for _, answer in silent), "a connection that sent nothing gets no answer"
    assert probes and all(status == b"HTTP/1.1 200 OK" and t < 1 for t, status in probes), probes


def test_keep_alive_requests_on_one_connection_still_work(port):
    """Each request within the deadline of the previous response, the last past the deadline of the opening: the
    deadline restarts after each response."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.connect()
    sock = conn.sock
    for _ in range(3):
        time.sleep(1.0)
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b'{"status":"ok"}')
        assert conn.sock is sock, "the connection was not kept alive"
    conn.close()


async def _keep_alive_then(port: int, second: bytes) -> tuple[float, bytes]:
    """One request on a keep-alive connection, then `second` (part of a head, or nothing): seconds from the end of
    the first answer to the close, and what came after the first answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(next(line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))[15:])
    await reader.readexactly(length)
    t0 = time.monotonic()
    writer.write(second)
    try:
        rest = await asyncio.wait_for(reader.read(), 5 + SLACK)
        return time.monotonic() - t0, rest
    except TimeoutError:
        return float("inf"), b""
    finally:
        writer.close()


async def _both(port: int) -> tuple[tuple[float, bytes], tuple[float, bytes]]:
    return await asyncio.gather(_keep_alive_then(port, b""), _keep_alive_then(port, PARTIAL_HEAD))  # type: ignore


def test_idle_keep_alive_is_closed_after_the_deadline(port):
    """Both below uvicorn's own 5 s keep-alive timeout: the head deadline, not that timer, closes them."""
    (idle_s, idle_rest), (partial_s, partial_rest) = asyncio.run(_both(port))
    print(f"\nkeep-alive: idle closed after {idle_s:.2f} s, partial second head answered after {partial_s:.2f} s")
    assert TIMEOUT - 0.1 <= idle_s <= TIMEOUT + SLACK and idle_rest == b""
    assert TIMEOUT - 0.1 <= partial_s <= TIMEOUT + SLACK and partial_rest.startswith(b"HTTP/1.1 408 ")
