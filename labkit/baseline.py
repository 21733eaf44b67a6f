"""The transformers baseline: what the course did before LMDeploy (`AutoModelForCausalLM`, bf16 on a
GPU, float32 on CPU), behind the same small surface as `labkit.engine.Engine`: `generate`,
`stream`, `close`, a `with` block. Used by lab 01 (baseline and speed comparison) and the playground.

    with HFEngine("generated:tiny-chat") as hf:
        print(hf.generate("hi", max_new_tokens=32).text)
"""
from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkit.backends import needs_remote_code
from labkit.engine import check_gen
from labkit.errors import EngineError
from labkit.live import Live



@dataclass
class HFResponse:
    """A reply (or, when streaming, a piece of one) with the field names of lmdeploy's `Response`."""

    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None = None
    index: int = 0


class HFEngine(Live):
    """A transformers model and tokenizer on one device, generating like the course's baseline."""

    kind = "baseline"

    def __init__(self, model: str | Path, device: str | None = None, name: str = "baseline"):
        from labkit.models import resolve

        self.model_dir = resolve(str(model))
        self.name = name
        import torch

        from labkit.gpu import has_cuda

        self.device = device or ("cuda" if has_cuda() else "cpu")
        close_baseline(name)  # re-running the cell that built it replaces it (and frees its memory) before the check
        if self.device.startswith("cuda"):
            from labkit.gpu import init_cuda_context
            from labkit.gpu import GiB, require_gpu
            from labkit.kvcache import weights_bytes

            require_gpu(min_free_gib=weights_bytes(self.model_dir) / GiB + 0.5,
                        what=f"loading {self.model_dir.name} with transformers")
            init_cuda_context(self.device)  # the CUDA context never goes back: count it before, not as ours
        self.dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.memory_before = _memory(self.device)
        start = time.perf_counter()
        remote = needs_remote_code(self.model_dir)
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a local load takes seconds: no progress bar in the notebook
        self.closed = True  # until the model is loaded
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=remote)
            self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype,
                                                              trust_remote_code=remote).to(self.device).eval()
        except BaseException as err:  # Ctrl-C too: the half-loaded model goes, so the cell can be re-run
            self.__dict__.pop("model", None)
            gc.collect()
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            if not isinstance(err, Exception):
                raise
            raise EngineError(f"transformers could not load {self.model_dir.name}: {type(err).__name__}: "
                              f"{' '.join(str(err).split())[:300]}. The generated model always loads: "
                              f"LABKIT_MODEL=generated:tiny-chat") from err
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.load_seconds = time.perf_counter() - start
        self.memory_after = _memory(self.device)
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = min(self.eos_ids) if self.eos_ids else 0
        self.backend = "transformers"
        self.closed = False
        self._keep()

    @property
    def memory_gib(self) -> float:
        """GPU memory the model took when it loaded, GiB (0 on CPU)."""
        return (self.memory_after - self.memory_before) / 2**30

    def describe(self) -> dict:
        """What ran: model, device, dtype, load time, memory."""
        return {"model": self.model_dir.name, "backend": "transformers", "device": self.device,
                "dtype": str(self.dtype).replace("torch.", ""), "load s": round(self.load_seconds, 1),
                "GPU memory GiB": round(self.memory_gib, 2)}

    def _check_open(self) -> None:
        if self.closed:
            raise EngineError(f"baseline {self.name!r} is closed: build a new one")

    def encode(self, prompt: str | list[dict]):
        """Token ids (a 1 x n tensor on the model's device) for a prompt or a message list, chat template applied."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
            raise EngineError("prompt must be a string or an OpenAI-style message list "
                              "[{'role': 'user', 'content': '...'}]")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(self.device)

    def _gen_kwargs(self, max_new_tokens: int = 256, temperature: float = 0.8, top_p: float = 0.8,
                    top_k: int = 40, repetition_penalty: float = 1.0, random_seed: int | None = None,
                    ignore_eos: bool = False, **unknown: Any) -> dict[str, Any]:
        if unknown:
            from labkit.engine import OPENAI_NAMES

            hints = [f"{k}= is the OpenAI name: use {OPENAI_NAMES[k]}=" for k in unknown if k in OPENAI_NAMES]
            raise EngineError("; ".join(hints) or f"unknown generation parameter(s) {', '.join(sorted(unknown))}: "
                              f"use max_new_tokens, temperature, top_p, top_k, repetition_penalty, random_seed")
        check_gen(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        self._check_open()
        if random_seed is not None:
            import torch

            torch.manual_seed(random_seed)
        kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                                  pad_token_id=self.pad_id)
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if ignore_eos:
            kw["min_new_tokens"] = max_new_tokens
        return kw

    def _finish(self, new_ids: list[int], input_len: int, skip_special_tokens: bool = True) -> HFResponse:
        """The reply for one sequence of generated ids: cut at the first stop token, like lmdeploy."""
        stop = next((i for i, t in enumerate(new_ids) if t in self.eos_ids), None)
        kept = new_ids if stop is None else new_ids[:stop]
        reason = "stop" if stop is not None else "length"
        text = self.tokenizer.decode(kept, skip_special_tokens=skip_special_tokens)
        return HFResponse(text, len(kept), input_len, reason)

    def generate(self, prompt: str | list[dict], **gen: Any) -> HFResponse:
        """One reply to a string or an OpenAI-style message list (fields as lmdeploy's Response)."""
        kw = self._gen_kwargs(**gen)
        ids = self.encode(prompt)
        import torch

        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        return self._finish(out[0, ids.shape[1]:].tolist(), ids.shape[1])

    def generate_text(self, text: str, skip_special_tokens: bool = True, **gen: Any) -> HFResponse:
        """One reply to text already rendered with the chat template (labkit.tools.LocalClient); InternLM2's
        tool calls are special tokens, so a tool parser wants skip_special_tokens=False."""
        kw = self._gen_kwargs(**gen)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(self.device)
        import torch

        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        return self._finish(out[0, ids.shape[1]:].tolist(), ids.shape[1], skip_special_tokens)

    def stream(self, prompt: str | list[dict], stop: threading.Event | None = None, **gen: Any) -> Iterator[HFResponse]:
        """Stream one reply: yields HFResponses whose .text is the new piece, the last with finish_reason;
        setting `stop` ends generate() after its current token (finish_reason 'abort', as lmdeploy says)."""
        kw = self._gen_kwargs(**gen)  # bad input fails here, before the generator starts
        return self._stream(self.encode(prompt), kw, stop)

    def _stream(self, ids, kw: dict[str, Any], stop: threading.Event | None = None) -> Iterator[HFResponse]:
        streamer = _counting_streamer(self.tokenizer)
        result: dict[str, Any] = {}
        ended = threading.Event()  # set when the caller stops early (break, Ctrl-C): generation ends at the next token
        criteria = _stop_when(ended, stop)

        def run():
            import torch

            try:
                with torch.inference_mode():
                    result["out"] = self.model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                                        stopping_criteria=criteria, **kw)
            except BaseException as err:  # shown in the caller's thread
                result["error"] = err
                streamer.end()

        thread = threading.Thread(target=run, daemon=True, name="labkit-hf-generate")
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield HFResponse(piece, streamer.tokens, ids.shape[1])
        finally:
            ended.set()
            while thread.is_alive():  # short joins, so that Ctrl-C is not held up until generation ends
                thread.join(0.05)
        if "error" in result:
            raise result["error"]
        final = self._finish(result["out"][0, ids.shape[1]:].tolist(), ids.shape[1])
        reason = "abort" if stop is not None and stop.is_set() and final.finish_reason == "length" else final.finish_reason
        yield HFResponse("", final.generate_token_len, final.input_token_len, reason)

    def close(self) -> None:
        """Free the model (and its GPU memory)."""
        if getattr(self, "closed", True):
            return
        self.closed = True
        self._forget()
        del self.model
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def __enter__(self) -> "HFEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.device
        return f"HFEngine({self.model_dir.name}, {state})"


_live = HFEngine._live  # name -> loaded HFEngine (labkit.live.Live keeps it)


def close_baseline(name: str) -> bool:
    """Close the live baseline called `name`, if any; True if one was closed."""
    return HFEngine.replace(name)


def _memory(device: str) -> int:
    """GPU bytes in use (NVML) for a model on `device`; 0 on CPU, where the model takes no GPU memory."""
    from labkit.gpu import memory_used_or_none

    return (memory_used_or_none() or 0) if device.startswith("cuda") else 0


def _counting_streamer(tokenizer):
    """A TextIteratorStreamer (text pieces, reply only) that also counts the tokens generated so far."""
    from transformers import TextIteratorStreamer

    class CountingStreamer(TextIteratorStreamer):
        def put(self, value):
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.tokens += int(value.numel())
            super().put(value)

    streamer = CountingStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    streamer.tokens = 0
    return streamer


def _stop_when(*events: threading.Event | None):
    """A transformers stopping criterion that ends generation once any of `events` is set (the Stop button, the
    reader going away)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    watched = [e for e in events if e is not None]

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            done = any(e.is_set() for e in watched)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Stop()])
