"""OpenAI-compatible HTTP server of the SIMULATION stand-in (threading http.server).

Behaviour modelled on vLLM 0.33.0 (shared/research/captures.md §8, domain.md §3.4-3.5):
the socket is bound before the (simulated) engine load, requests queue until it is done;
`/health` 200 with an empty body; API keys guard paths under /v1, /v2, /inference,
/cohere with a Bearer token and answer 401 `{"error":"Unauthorized"}`; compact JSON bodies.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import signal
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from vllm import __version__

PROTECTED = ("/v1", "/v2", "/inference", "/cohere")
REPLY = "SIMULATION: gpunode lab vLLM stand-in; no model was run."
ROUTES = [
    ("/health", "GET"),
    ("/load", "GET"),
    ("/ping", "GET, POST"),
    ("/version", "GET"),
    ("/v1/models", "GET"),
    ("/v1/chat/completions", "POST"),
    ("/v1/completions", "POST"),
    ("/metrics", "GET"),
]


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success: dict[str, int] = {"stop": 0, "length": 0, "abort": 0}
        self.http: dict[tuple[str, str, str], int] = {}


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class App:
    def __init__(self, ns: argparse.Namespace, keys: list[str], gpus: list[Any], plan: Any, log: Any) -> None:
        self.ns = ns
        self.key_digests = [_digest(k) for k in keys]
        self.names = list(ns.served_model_name or [ns.model])
        self.plan = plan
        self.gpus = gpus
        self.log = log
        self.stats = Stats()
        self.created = int(time.time())
        self.access_log = not ns.disable_uvicorn_access_log
        quiet = ns.disable_access_log_for_endpoints or ""
        self.quiet_paths = {p.strip() for p in quiet.split(",") if p.strip()}


def make_handler(app: App) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "uvicorn"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        # -------------------------------------------------------------- plumbing

        def _access(self, status: int) -> None:
            path = self.path.split("?", 1)[0]
            key = (path, self.command, f"{status // 100}xx")
            with app.stats.lock:
                app.stats.http[key] = app.stats.http.get(key, 0) + 1
            if app.access_log and path not in app.quiet_paths:
                host, port = (self.client_address + ("", 0))[:2] if self.client_address else ("", 0)
                phrase = self.responses.get(status, ("",))[0]
                app.log.plain(
                    f'INFO:     {host}:{port} - "{self.command} {self.path} HTTP/1.1" {status} {phrase}'
                )

        def _send(self, status: int, body: bytes = b"", ctype: str = "application/json") -> None:
            self.send_response_only(status)
            self.send_header("date", self.date_time_string())
            self.send_header("server", "uvicorn")
            if body or ctype != "application/json":
                self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)
            self._access(status)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, _compact(obj))

        def _error(self, status: int, message: str, kind: str, param: str | None = None) -> None:
            self._json(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})

        def _authorized(self) -> bool:
            path = self.path.split("?", 1)[0]
            if not app.key_digests or self.command == "OPTIONS":
                return True
            if not any(path == p or path.startswith(p + "/") for p in PROTECTED):
                return True
            scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
            if scheme.lower() != "bearer":
                return False
            d = _digest(token)
            return any(hmac.compare_digest(d, k) for k in app.key_digests)

        def _body(self) -> dict[str, Any] | None:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            try:
                doc = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                self._error(400, "Invalid JSON body", "BadRequestError")
                return None
            if not isinstance(doc, dict):
                self._error(400, "The request body must be a JSON object", "BadRequestError")
                return None
            return doc

        # -------------------------------------------------------------- routes

        def do_GET(self) -> None:  # noqa: N802
            self._route("GET")

        def do_HEAD(self) -> None:  # noqa: N802
            self._route("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._route("POST")

        def _route(self, method: str) -> None:
            if not self._authorized():
                self._json(401, {"error": "Unauthorized"})
                return
            path = self.path.split("?", 1)[0]
            if method == "GET" and path in ("/health", "/ping"):
                self._send(200)
            elif method == "POST" and path == "/ping":
                self._send(200)
            elif method == "GET" and path == "/version":
                self._json(200, {"version": __version__})
            elif method == "GET" and path == "/load":
                self._json(200, {"server_load": app.stats.running})
            elif method == "GET" and path == "/metrics":
                self._send(200, metrics(app).encode(), "text/plain; version=0.0.4; charset=utf-8")
            elif method == "GET" and path == "/v1/models":
                self._json(200, models(app))
            elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
                self._complete(chat=path.endswith("chat/completions"))
            elif path in {r for r, _ in ROUTES}:
                self._json(405, {"detail": "Method Not Allowed"})
            else:
                self._json(404, {"detail": "Not Found"})

        def _complete(self, chat: bool) -> None:
            req = self._body()
            if req is None:
                return
            model = req.get("model") or app.names[0]
            if model not in app.names:
                self._error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
                return
            if chat:
                msgs = req.get("messages")
                if not isinstance(msgs, list) or not msgs:
                    self._error(400, "messages must be a non-empty list", "BadRequestError", "messages")
                    return
                prompt = " ".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))
            else:
                p = req.get("prompt")
                if p is None:
                    self._error(400, "prompt is required", "BadRequestError", "prompt")
                    return
                prompt = p if isinstance(p, str) else json.dumps(p)
            max_tokens = int(req.get("max_tokens") or req.get("max_completion_tokens") or 16)
            words = REPLY.split(" ")
            out = words[:max_tokens]
            finish = "stop" if len(out) == len(words) else "length"
            ptoks = max(1, len(prompt.split()))
            with app.stats.lock:
                app.stats.running += 1
            try:
                rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
                if req.get("stream"):
                    self._stream(rid, model, chat, out, finish, ptoks)
                else:
                    text = " ".join(out)
                    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
                    if chat:
                        choice["message"] = {"role": "assistant", "content": text}
                    else:
                        choice["text"] = text
                    self._json(
                        200,
                        {
                            "id": rid,
                            "object": "chat.completion" if chat else "text_completion",
                            "created": int(time.time()),
                            "model": model,
                            "choices": [choice],
                            "usage": {
                                "prompt_tokens": ptoks,
                                "completion_tokens": len(out),
                                "total_tokens": ptoks + len(out),
                            },
                        },
                    )
            finally:
                with app.stats.lock:
                    app.stats.running -= 1
                    app.stats.prompt_tokens += ptoks
                    app.stats.generation_tokens += len(out)
                    app.stats.success[finish] += 1

        def _stream(self, rid: str, model: str, chat: bool, out: list[str], finish: str, ptoks: int) -> None:
            self.send_response_only(200)
            self.send_header("date", self.date_time_string())
            self.send_header("server", "uvicorn")
            self.send_header("content-type", "text/event-stream; charset=utf-8")
            self.send_header("connection", "close")
            self.end_headers()
            self.close_connection = True
            obj = "chat.completion.chunk" if chat else "text_completion"
            created = int(time.time())

            def event(choice: dict[str, Any]) -> None:
                data = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
                self.wfile.write(b"data: " + _compact(data) + b"\n\n")
                self.wfile.flush()

            if chat:
                event(
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                )
            for i, w in enumerate(out):
                piece = w if i == 0 else " " + w
                last = i == len(out) - 1
                if chat:
                    event(
                        {
                            "index": 0,
                            "delta": {"content": piece},
                            "logprobs": None,
                            "finish_reason": finish if last else None,
                        }
                    )
                else:
                    event(
                        {
                            "index": 0,
                            "text": piece,
                            "logprobs": None,
                            "finish_reason": finish if last else None,
                        }
                    )
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self._access(200)

    return Handler


def models(app: App) -> dict[str, Any]:
    data = []
    for name in app.names:
        data.append(
            {
                "id": name,
                "object": "model",
                "created": app.created,
                "owned_by": "vllm",
                "root": app.ns.model,
                "parent": None,
                "max_model_len": app.plan.max_model_len,
                "permission": [
                    {
                        "id": "modelperm-" + uuid.uuid4().hex[:16],
                        "object": "model_permission",
                        "created": app.created,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
        )
    return {"object": "list", "data": data}


def metrics(app: App) -> str:
    """Prometheus text with vLLM's V1 metric names and HELP strings (captures.md §8.6)."""
    s = app.stats
    lbl = f'engine="0",model_name="{app.names[0]}"'
    out: list[str] = []

    def fam(name: str, kind: str, helptext: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {helptext}")
        out.append(f"# TYPE {name} {kind}")
        for suffix_labels, value in samples:
            out.append(f"{name}{suffix_labels} {float(value)}")

    with s.lock:
        fam(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            [(f"{{{lbl}}}", s.running)],
        )
        fam(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            [(f"{{{lbl}}}", 0)],
        )
        fam(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            [(f"{{{lbl}}}", 0)],
        )
        fam(
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            [(f"{{{lbl}}}", s.prompt_tokens)],
        )
        fam(
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            [(f"{{{lbl}}}", 0)],
        )
        fam(
            "vllm:num_preemptions_total",
            "counter",
            "Cumulative number of preemption from the engine.",
            [(f"{{{lbl}}}", 0)],
        )
        fam(
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            [(f"{{{lbl}}}", s.prompt_tokens)],
        )
        fam(
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            [(f"{{{lbl}}}", s.generation_tokens)],
        )
        fam(
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            [
                (f'{{engine="0",finished_reason="{r}",model_name="{app.names[0]}"}}', n)
                for r, n in sorted(s.success.items())
            ],
        )
        cache = (
            f'{{block_size="{app.ns.block_size or 16}",cache_dtype="{app.ns.kv_cache_dtype or "auto"}",'
            f'engine="0",gpu_memory_utilization="{app.ns.gpu_memory_utilization or 0.92}",'
            f'num_gpu_blocks="{app.plan.tokens // (app.ns.block_size or 16)}"}}'
        )
        fam("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig", [(cache, 1)])
        for (path, method, status), n in sorted(s.http.items()):
            out.append(
                f'http_requests_total{{handler="{path}",method="{method}",status="{status}"}} {float(n)}'
            )
    return "\n".join(out) + "\n"


def _proc_record_path() -> str | None:
    root = os.environ.get("GPUNODE_SIM_ROOT", "/") or "/"
    run = os.path.join(root, "run/gpunode-sim")
    if not os.path.isdir(run):
        return None
    return os.path.join(run, "procs", f"{os.getpid()}.json")


def run(ns: argparse.Namespace, keys: list[str], gpus: list[Any], plan: Any, log: Any) -> int:
    host = ns.host if ns.host is not None else ""
    port = ns.port if ns.port is not None else 8000
    app = App(ns, keys, gpus, plan, log)
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    if host and ":" in host:
        ThreadingHTTPServer.address_family = socket.AF_INET6
    try:
        httpd = ThreadingHTTPServer((host, port), make_handler(app))  # bound before the load
    except OSError as exc:
        log(f"Failed to bind {host or '0.0.0.0'}:{port}: {exc.strerror}", level="ERROR")
        print(f"OSError: [Errno {exc.errno}] {exc.strerror}", flush=True)
        return 1

    record = _proc_record_path()
    if record:
        try:
            os.makedirs(os.path.dirname(record), exist_ok=True)
            with open(record, "w", encoding="utf-8") as f:
                json.dump(
                    {
                        "pid": os.getpid(),
                        "name": "VLLM::EngineCore",
                        "memory_mib": {g.uuid: plan.per_gpu_mib for g in gpus},
                    },
                    f,
                )
        except OSError:
            record = None  # sandboxed service without write access to /run: no record

    stopping = threading.Event()

    def on_term(_sig: int, _frm: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        delay = float(os.environ.get("GPUNODE_SIM_VLLM_LOAD_SECONDS", "1.5"))
        stopping.wait(delay)  # simulated weight load / profiling / CUDA graphs
        if stopping.is_set():
            return 0
        log(
            f"init engine (profile, create kv cache, warmup model) took {delay:.2f} seconds",
            proc="EngineCore_DP0",
            where="core.py:218",
        )
        log(
            f"Engine 000: vllm cache_config_info with initialization after num_gpu_blocks is: "
            f"{plan.tokens // (ns.block_size or 16)}",
            where="loggers.py:142",
        )
        log("Supported_tasks: ['generate']", where="api_server.py:1692")
        shown = host or "0.0.0.0"
        log(f"Starting vLLM API server 0 on http://{shown}:{port}", where="api_server.py:1971")
        log("Available routes are:", where="launcher.py:36")
        for route, methods in ROUTES:
            log(f"Route: {route}, Methods: {methods}", where="launcher.py:44")
        log.plain(f"INFO:     Started server process [{os.getpid()}]")
        log.plain("INFO:     Waiting for application startup.")
        log.plain("INFO:     Application startup complete.")
        httpd.serve_forever(poll_interval=0.2)
        log.plain("INFO:     Shutting down")
        timeout = float(ns.shutdown_timeout or 0)
        end = time.time() + timeout
        while app.stats.running and time.time() < end:
            time.sleep(0.1)
        log.plain("INFO:     Waiting for application shutdown.")
        log.plain("INFO:     Application shutdown complete.")
        log.plain(f"INFO:     Finished server process [{os.getpid()}]")
        return 0
    finally:
        httpd.server_close()
        if record:
            try:
                os.remove(record)
            except FileNotFoundError:
                pass
