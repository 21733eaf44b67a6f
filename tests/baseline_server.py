"""A small real OpenAI-compatible server for CPU tests: FastAPI + uvicorn, /v1/models and /v1/chat/completions
(plain and streamed), answered by labkit's transformers baseline on a real model. Where CUDA exists the tests
use `lmdeploy serve api_server` instead; lmdeploy's api_server needs CUDA.

    python tests/baseline_server.py PORT [MODEL]      (MODEL defaults to generated:tiny-chat)
"""
from __future__ import annotations

import json
import sys
import time
import uuid

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from labkit.baseline import HFEngine


class ChatRequest(BaseModel):
    model: str
    messages: list[dict]
    max_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 40
    stream: bool = False


def make_app(model: str) -> FastAPI:
    engine = HFEngine(model, device="cpu", name="baseline-server")
    name = engine.model_dir.name
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "labkit"}]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        if req.model != name:
            raise HTTPException(404, f"the model {req.model!r} does not exist; this server has {name!r}")
        gen = dict(max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:8]}", "created": int(time.time()), "model": name}
        if not req.stream:
            r = engine.generate(req.messages, **gen)
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                                 "finish_reason": r.finish_reason}],
                    "usage": {"prompt_tokens": r.input_token_len, "completion_tokens": r.generate_token_len,
                              "total_tokens": r.input_token_len + r.generate_token_len}}

        def events():
            for piece in engine.stream(req.messages, **gen):
                chunk = {**head, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": {"content": piece.text}, "finish_reason": piece.finish_reason}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


if __name__ == "__main__":
    port = int(sys.argv[1])
    uvicorn.run(make_app(sys.argv[2] if len(sys.argv) > 2 else "generated:tiny-chat"), host="127.0.0.1", port=port,
                log_level="warning")
