"""A local OpenAI-compatible chat-completions server that plays back a scripted
conversation over real HTTP on loopback (the real `openai` client talks to it)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def tool_call_response(calls: list[tuple[str, str]], content: str = "") -> dict:
    """calls: (function name, raw JSON arguments string)."""
    return {"message": {"role": "assistant", "content": content, "tool_calls": [
        {"id": f"call_{i}_{int(time.time() * 1e6)}", "type": "function",
         "function": {"name": n, "arguments": a}} for i, (n, a) in enumerate(calls)]},
        "finish_reason": "tool_calls"}


def text_response(text: str) -> dict:
    return {"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}


class FakeOpenAI:
    """script: list of responses (dicts from the helpers above), ints (an HTTP error status
    to return once, e.g. 429 or 500, which the client must retry) or callables (request body
    -> response dict, for replies that depend on the prompt)."""

    def __init__(self, script: list):
        self.script = list(script)
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                item = fake.script.pop(0) if fake.script else text_response("done")
                if callable(item):
                    item = item(body)
                if isinstance(item, int):
                    payload = json.dumps({"error": {"message": "scripted error", "type": "rate_limit"}}).encode()
                    self.send_response(item)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                payload = json.dumps({
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "fake"),
                    "choices": [{"index": 0, **item}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
