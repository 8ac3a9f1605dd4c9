"""A small real HTTP/1.1 server on a free loopback port that misbehaves on request, for the upstream client tests.

The path picks the behaviour: `/{tag}/{behaviour}/v1/chat/completions` (or `/completions`), so each test uses
its own tag and reads back how many requests that tag got (`hits`) and the last one's headers and body.
Behaviours, `-` separating their arguments:
  ok              a valid answer (a stream of chunks ending in usage and [DONE] when the body asks to stream)
  no-usage        a valid answer without usage
  hang            reads the request and never answers
  slow-<ms>       waits, then answers ok
  close           closes the connection without answering
  status-<code>   that status with an OpenAI-style error body
  retry-after-<s> 429 with Retry-After: s
  fail-<n>-<code> the tag's first n requests get that status, the rest ok
  echo-auth       401 whose error message repeats the Authorization header it got
  non-json        200 with an HTML page
  no-choices      200 with JSON that has no choices
  wrong-types     200 with choices of the wrong types
  cut             a stream cut (connection closed, chunked body unfinished) after its first chunk
  stall           stream headers, then nothing
  no-done         a stream that ends cleanly without [DONE]
Every response closes its connection. Raw asyncio rather than a framework, so that a cut is a real cut.
"""
from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter

PROMPT_TOKENS, CACHED_TOKENS, COMPLETION_TOKENS = 10, 4, 2
USAGE = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
         "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS, "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS}}
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
           500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


def answer(chat: bool, usage: bool = True) -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"} if chat
              else {"index": 0, "text": "hello", "finish_reason": "stop"})
    return {"id": "cmpl-fault", "object": "chat.completion" if chat else "text_completion", "model": "fault-model",
            "choices": [choice], **({"usage": USAGE} if usage else {})}


def chunks(chat: bool, usage: bool) -> list[dict]:
    def chunk(text, finish=None):
        choice = ({"index": 0, "delta": {"content": text}, "finish_reason": finish} if chat
                  else {"index": 0, "text": text, "finish_reason": finish})
        return {"id": "cmpl-fault", "object": "chat.completion.chunk" if chat else "text_completion",
                "choices": [choice]}
    out = [chunk("hel"), chunk("lo"), chunk("", "stop")]
    if usage:
        out.append({"id": "cmpl-fault", "object": "chat.completion.chunk", "choices": [], "usage": USAGE})
    return out


class FaultServer:
    def __init__(self) -> None:
        self.port = 0
        self.hits: Counter[str] = Counter()  # requests per tag
        self.headers: dict[str, dict[str, str]] = {}  # the last request's headers per tag (lower-case names)
        self.bodies: dict[str, dict] = {}  # the last request's JSON body per tag
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="fault-server", daemon=True)

    def url(self, tag: str, behaviour: str) -> str:
        return f"http://127.0.0.1:{self.port}/{tag}/{behaviour}/v1"

    def start(self) -> "FaultServer":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stopped.wait()
        for task in asyncio.all_tasks():  # hanging handlers
            if task is not asyncio.current_task():
                task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in header_lines:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            raw = await reader.readexactly(int(headers.get("content-length", "0")))
            body = json.loads(raw) if raw else {}
            _, path, _ = request_line.split(" ", 2)
            _, tag, behaviour, *rest = path.split("/")
            with self._lock:
                self.hits[tag] += 1
                num_hits = self.hits[tag]
                self.headers[tag] = headers
                self.bodies[tag] = body
            if behaviour == "echo-auth":
                return await self._json(writer, 401, {"error": {"message": f"bad key {headers.get('authorization')}"}})
            await self._behave(writer, behaviour, num_hits, chat=rest[-1] == "completions" and rest[-2] == "chat",
                               stream=bool(body.get("stream")),
                               usage=bool((body.get("stream_options") or {}).get("include_usage")))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _behave(self, writer, behaviour: str, num_hits: int, chat: bool, stream: bool, usage: bool) -> None:
        name, *args = behaviour.split("-")
        if name == "slow":
            await asyncio.sleep(int(args[0]) / 1000)
        elif name == "hang":
            await asyncio.sleep(3600)
        elif name == "close":
            return
        elif name == "status":
            return await self._json(writer, int(args[0]), {"error": {"message": f"fault {args[0]}"}})
        elif name == "retry" and args[0] == "after":
            return await self._json(writer, 429, {"error": {"message": "slow down"}}, {"Retry-After": args[1]})
        elif name == "fail" and num_hits <= int(args[0]):
            return await self._json(writer, int(args[1]), {"error": {"message": f"failure {num_hits}"}})
        elif name == "non":
            return await self._send(writer, 200, b"<html>oops</html>", {"Content-Type": "text/html"})
        elif name == "no" and args == ["choices"]:
            return await self._json(writer, 200, {"id": "x", "object": "chat.completion", "usage": USAGE})
        elif name == "wrong":
            return await self._json(writer, 200, {"id": "x", "choices": [{"index": 0, "message": {"content": 7}}]})
        if not stream:
            return await self._json(writer, 200, answer(chat, usage=behaviour != "no-usage"))
        await self._stream(writer, behaviour, chunks(chat, usage and behaviour != "no-usage"))

    async def _stream(self, writer, behaviour: str, events: list[dict]) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n")
        await writer.drain()
        if behaviour == "stall":
            await asyncio.sleep(3600)
        for i, event in enumerate(events):
            await self._chunk(writer, f"data: {json.dumps(event)}\n\n".encode())
            if behaviour == "cut":
                writer.write(b"40\r\ndata: {\"id\": \"cut")  # half a chunk, then the connection goes
                await writer.drain()
                return
        if behaviour != "no-done":
            await self._chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    @staticmethod
    async def _chunk(writer, data: bytes) -> None:
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()

    async def _json(self, writer, status: int, payload: dict, headers: dict | None = None) -> None:
        await self._send(writer, status, json.dumps(payload).encode(),
                         {"Content-Type": "application/json", **(headers or {})})

    @staticmethod
    async def _send(writer, status: int, body: bytes, headers: dict) -> None:
        head = f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in {**headers, "Content-Length": len(body),
                                                       "Connection": "close"}.items())
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()
