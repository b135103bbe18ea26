"""A time budget per request, and the end of its work when the client leaves.

`RequestBudget` (ASGI middleware) gives every HTTP request a `Budget`, reachable by its handler as
`request.scope["dinokit.budget"]`, and watches the connection while the handler runs:
- the client disconnects: the budget is stopped and the handler cancelled (nothing is answered);
- the budget's time runs out before the answer has started: the budget is stopped, the handler cancelled and
  the client gets 504 with a JSON error naming `--request-timeout`.
The clock starts when the request's body has arrived (a slow upload spends the client's time, not the server's
work) and stops counting once the answer starts (a large file may take as long to send as the client needs).
Cancelling the handler only ends its awaiting; the work it started in a lane (lanes.py) sees the stopped budget
through its `stop` callable and ends at its next stop point, or is skipped if it had not started.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from starlette.responses import JSONResponse

log = logging.getLogger("dinokit.serve")

SCOPE_KEY = "dinokit.budget"


class Budget:
    """The time one request may take (None: no limit) and whether its work should stop. Thread-safe to read."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.deadline: float | None = None  # set by start()
        self.reason = ""
        self._stopped = threading.Event()

    def start(self) -> None:
        if self.seconds and self.deadline is None:
            self.deadline = time.monotonic() + self.seconds

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def stop(self, reason: str) -> None:
        if not self._stopped.is_set():
            self.reason = reason
            self._stopped.set()

    def stopped(self) -> bool:
        """True once the request is over: stopped, or past its deadline (so work stops on time even when the
        event loop is late to notice)."""
        return self._stopped.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline)


def budget_of(scope) -> Budget:
    """The request's budget; an unlimited one when the app runs without the middleware."""
    budget = scope.get(SCOPE_KEY)
    if budget is None:
        budget = scope[SCOPE_KEY] = Budget(None)
    return budget


def timeout_message(seconds: float) -> str:
    return (f"this request took longer than the server's budget of {seconds:g} s per request and was stopped "
            f"(the server's --request-timeout); retry with a smaller image or later")


class RequestBudget:
    """ASGI middleware: a Budget of `seconds` (None or 0: no time limit) per HTTP request; see the module notes.

    `counts` holds the totals answered 504 (timed_out) and abandoned by their clients (disconnected)."""

    def __init__(self, app, seconds: float | None) -> None:
        self.app, self.seconds = app, (seconds or None)
        self.counts = {"timed_out": 0, "disconnected": 0}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        budget = scope[SCOPE_KEY] = Budget(self.seconds)
        loop = asyncio.get_running_loop()
        arrived = time.monotonic()
        body_in, gone = asyncio.Event(), asyncio.Event()
        answer_started = answer_sent = False
        headers = dict(scope.get("headers") or [])
        bodyless = b"transfer-encoding" not in headers and headers.get(b"content-length", b"0").strip() in (b"0", b"")
        first_message = loop.create_future()  # bodyless requests: the empty body message, read by the watcher
        handed_first = False

        async def watch():
            """Read the connection once the app has the whole body: the next message is the disconnect."""
            if bodyless:
                message = await receive()
                first_message.set_result(message)
                if message["type"] == "http.disconnect":
                    gone.set()
                    return
                body_in.set()
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher: asyncio.Task | None = asyncio.ensure_future(watch()) if bodyless else None

        async def app_receive():
            nonlocal watcher, handed_first
            if bodyless and not handed_first:
                handed_first = True
                return await asyncio.shield(first_message)
            if bodyless or body_in.is_set():  # the watcher owns the connection now
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                body_in.set()
                watcher = asyncio.ensure_future(watch())
            return message

        async def app_send(message):
            nonlocal answer_started, answer_sent
            if message["type"] == "http.response.start":
                answer_started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                answer_sent = True  # from here on the server reports a disconnect: nobody left early
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, app_receive, app_send))
        waits = {"gone": asyncio.ensure_future(gone.wait()), "body": asyncio.ensure_future(body_in.wait())}
        try:
            while True:
                if body_in.is_set():
                    budget.start()
                pending = {handler, waits["gone"]} | ({waits["body"]} if not body_in.is_set() else set())
                limit = None if answer_started else budget.remaining()
                done, _ = await asyncio.wait(pending, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
                if handler in done or (waits["gone"] in done and answer_sent):
                    return await handler
                if waits["gone"] in done or (not done and not answer_started):
                    break
            ending = "disconnected" if gone.is_set() else "timed_out"
            budget.stop("the client disconnected" if gone.is_set() else "its time budget is spent")
            handler.cancel()
            try:
                await handler
            except (asyncio.CancelledError, Exception):
                pass
            self.counts[ending] += 1
            seconds = time.monotonic() - arrived
            if ending == "disconnected":
                log.info("%s %s: the client left after %.1f s; its work is stopped", scope["method"], scope["path"],
                         seconds)
                return
            log.warning("%s %s: over the budget of %g s (--request-timeout) after %.1f s; answered 504 and its "
                        "work is stopped", scope["method"], scope["path"], self.seconds, seconds)
            if not answer_started:
                await JSONResponse({"error": timeout_message(self.seconds)}, status_code=504)(scope, receive, send)
        finally:  # the request is over, however it ended (e.g. cancelled at shutdown): so is its work
            budget.stop("its request is over")
            for task in (handler, watcher, *waits.values()):
                if task is not None and not task.done():
                    task.cancel()
