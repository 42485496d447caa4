"""`isl serve`: uvicorn over the app, with a deadline on each request head.

uvicorn (0.54, h11) has no header read timeout: a connection that sends nothing, or a request head a byte every few
seconds (slowloris), is held for ever, and a few hundred of them pin file descriptors and memory. Its keep-alive timer
runs only between requests and is cancelled by the first byte of the next one. Never imports torch."""
from __future__ import annotations

import asyncio
import os
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.settings import Settings

TIMEOUT_BODY = b"Request Timeout: the request head did not arrive in time\n"


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: ISL_HEADER_TIMEOUT_S after the connection opens, or after the previous response
    completed (keep-alive), a connection without a whole request head is closed, with a 408 when part of a head came
    and silently when nothing did. Arriving bytes do not move the deadline (a trickle must not extend it); it ends when
    the request cycle starts, since a stalled body is the body-timeout middleware's job."""

    timeout_s: ClassVar[float] = 0.0  # this process's deadline; 0: not read from Settings yet (which refuses 0)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not TimedH11Protocol.timeout_s:  # a spawned worker process: run() did not set it here
            TimedH11Protocol.timeout_s = Settings().header_timeout_s
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a head was parsed (or refused with 400): the cycle has started
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():  # armed before super(), which may parse a pipelined head at once
            self._arm_head_deadline()
        super().on_response_complete()

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self.head_deadline = self.loop.call_later(self.timeout_s, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_timed_out(self) -> None:
        """h11 keeps the bytes of an unfinished head unparsed (`trailing_data`): some there means a client to answer."""
        self.head_deadline = None
        if self.transport.is_closing():
            return
        events: list[h11.Event] = [h11.ConnectionClosed()]
        if self.conn.trailing_data[0]:
            headers = [*self.server_state.default_headers, (b"content-type", b"text/plain; charset=utf-8"),
                       (b"content-length", str(len(TIMEOUT_BODY)).encode()), (b"connection", b"close")]
            events = [h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
                      h11.Data(data=TIMEOUT_BODY), h11.EndOfMessage(), *events]
            self.logger.info("%s - request head not complete within %s s: 408", self.client, self.timeout_s)
        try:
            self.transport.write(b"".join(self.conn.send(event) or b"" for event in events))
        except h11.LocalProtocolError:  # a state h11 cannot answer from: closing is all that is left
            pass
        self.transport.close()


def run(host: str, port: int, workers: int = 1, log_level: str = "warning",
        header_timeout_s: float | None = None) -> None:
    """Serves `service.app:create_app`. The protocol goes by import string, which a single process and spawned worker
    processes both accept; the head deadline (default: Settings) reaches the workers through ISL_HEADER_TIMEOUT_S, as
    every other setting does, and is validated here before the port opens."""
    if header_timeout_s is not None:
        os.environ["ISL_HEADER_TIMEOUT_S"] = repr(float(header_timeout_s))
    TimedH11Protocol.timeout_s = Settings().header_timeout_s
    uvicorn.run("service.app:create_app", factory=True, host=host, port=port, workers=workers, log_level=log_level,
                http="service.server:TimedH11Protocol")

