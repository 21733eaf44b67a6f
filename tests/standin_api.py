"""Stand-in for `lmdeploy serve api_server` on a CPU machine (lab 07's proxy tests): a small real HTTP server.

    python standin_api.py PORT MODEL_NAME HOST [--proxy-url URL] [--token-delay S] [--start-delay S]
                          [--burst N] [--prefill S]

Like lmdeploy's api_server it registers itself with the proxy at start (POST URL/nodes/add with its
url and models) and answers /v1/models, /health, /metrics (Prometheus text: running requests, a
request counter, generation tokens) and /v1/chat/completions (streamed or not, with finish_reason and
usage). Every reply says which stand-in wrote it ("from PORT"), so a test sees where the proxy routed.
With --enable-prefix-caching it reports a system prompt it has seen before as cached (usage and /metrics);
a request with a response_format gets '{"name": "Stand In", "age": 7}' (what constrained decoding yields).
--burst N streams like TurboMind: N tokens back to back (one chunk each), then a wait of N token delays;
--prefill S holds one lock S seconds before a request's first token (prefills queue, as on one GPU).
"""
import json
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, name, host = int(sys.argv[1]), sys.argv[2], sys.argv[3]


def opt(flag, default=None):
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


proxy_url, delay = opt("--proxy-url"), float(opt("--token-delay", "0.01"))
burst, prefill = int(opt("--burst", "1")), float(opt("--prefill", "0"))
prefill_lock = threading.Lock()
state = {"running": 0, "done": 0, "tokens": 0, "prompt": 0, "cached": 0}
prefix_caching, seen = "--enable-prefix-caching" in sys.argv, set()
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def send(self, code, obj, ctype="application/json"):
        body = obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            return self.send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
        if self.path == "/health":
            return self.send(200, "", "text/plain")
        if self.path.startswith("/metrics"):
            with lock:
                text = ("# TYPE lmdeploy:num_requests_running gauge\n"
                        f'lmdeploy:num_requests_running{{engine="0",model_name="{name}"}} {state["running"]}.0\n'
                        "# TYPE lmdeploy:num_requests_waiting gauge\n"
                        f'lmdeploy:num_requests_waiting{{engine="0",model_name="{name}"}} 0.0\n'
                        "# TYPE lmdeploy:gpu_cache_usage_perc gauge\n"
                        f'lmdeploy:gpu_cache_usage_perc{{engine="0",model_name="{name}"}} '
                        f'{min(1.0, state["running"] / 10):.2f}\n'
                        "# TYPE lmdeploy:generation_tokens counter\n"
                        f'lmdeploy:generation_tokens_total{{engine="0",model_name="{name}"}} {state["tokens"]}.0\n'
                        "# TYPE lmdeploy:cached_tokens counter\n"
                        f'lmdeploy:cached_tokens_total{{engine="0",model_name="{name}"}} {state["cached"]}.0\n'
                        "# TYPE lmdeploy:request_prompt_tokens histogram\n"
                        f'lmdeploy:request_prompt_tokens_count{{engine="0",model_name="{name}"}} {state["done"]}.0\n'
                        f'lmdeploy:request_prompt_tokens_sum{{engine="0",model_name="{name}"}} {state["prompt"]}.0\n')
            return self.send(200, text, "text/plain; version=0.0.4")
        self.send(404, {"detail": "Not Found"})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path != "/v1/chat/completions":
            return self.send(404, {"detail": "Not Found"})
        n = int(req.get("max_tokens") or 8)
        words = [f"from {port} "] + ["word "] * (n - 1)
        finish = "length"
        if req.get("response_format"):
            words, finish, n = ['{"name": "Stand In", "age": 7}'], "stop", 1
        head = {"id": f"standin-{port}", "created": 0, "model": req.get("model") or name}
        text = " ".join(str(m.get("content")) for m in req.get("messages") or [])
        prompt = 5 + len(text) // 4
        system = next((m.get("content") for m in req.get("messages") or [] if m.get("role") == "system"), None)
        cached = len(system) // 4 if prefix_caching and system in seen else 0
        if system is not None:
            seen.add(system)
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": n + prompt,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        with lock:
            state["prompt"] += prompt
            state["cached"] += cached
        with lock:
            state["running"] += 1
        try:
            if prefill:
                with prefill_lock:
                    time.sleep(prefill)
            if not req.get("stream"):
                time.sleep(delay * n)
                msg = {"role": "assistant", "content": "".join(words)}
                return self.send(200, {**head, "object": "chat.completion", "usage": usage,
                                       "choices": [{"index": 0, "finish_reason": finish, "message": msg}]})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for i, word in enumerate(words):
                if i % burst == 0:
                    time.sleep(delay * burst)
                last = i == len(words) - 1
                chunk = {**head, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": {"content": word},
                                      "finish_reason": finish if last else None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                with lock:
                    state["tokens"] += 1
            if (req.get("stream_options") or {}).get("include_usage"):
                self.wfile.write(f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True
        finally:
            with lock:
                state["running"] -= 1
                state["done"] += 1

    def log_message(self, *a):
        pass


time.sleep(float(opt("--start-delay", "0")))  # an engine that takes a while to load
ThreadingHTTPServer.request_queue_size = 128  # listen backlog (uvicorn's is 2048): with socketserver's 5, a burst
server = ThreadingHTTPServer((host, port), Handler)  # of connects loses SYNs, which the client resends after 1 s
server.daemon_threads = True
if proxy_url:  # as lmdeploy's api_server does once its engine is up (register_to_proxy)
    def register():
        time.sleep(0.2)
        body = json.dumps({"url": f"http://{host}:{port}", "status": {"models": [name], "role": 1}}).encode()
        req = urllib.request.Request(proxy_url + "/nodes/add", data=body, headers={"Content-Type": "application/json"})
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10).read()
        print(f"registered with {proxy_url}", flush=True)
    threading.Thread(target=register, daemon=True).start()
print(f"standin {port} up", flush=True)
server.serve_forever()
