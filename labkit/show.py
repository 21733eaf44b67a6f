"""Show results in a notebook: a streamed reply as it arrives, measured (`stream_to_notebook(eng.stream(...))`,
for lmdeploy's `stream_infer` Responses and the transformers baseline alike; labs 01, 02, 05, 06), lmdeploy
Responses as a table (labs 01, 05), and what bad inputs are refused with (labs 04, 05).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass


@dataclass
class StreamResult:
    """A streamed reply: its text, tokens, and how fast it came."""

    text: str
    tokens: int
    seconds: float
    ttft_s: float | None
    tokens_per_s: float
    finish_reason: str | None
    input_tokens: int | None = None

    def as_dict(self) -> dict:
        """Plain dict, for tables and evidence."""
        return asdict(self)

    def summary(self) -> str:
        """One line: tokens, time, speed, time to first token, why it stopped."""
        first = f", first token after {self.ttft_s * 1000:,.0f} ms" if self.ttft_s is not None else ""
        return (f"{self.tokens} tokens in {self.seconds:.2f} s = {self.tokens_per_s:,.1f} tokens/s{first}, "
                f"finish_reason={self.finish_reason}")

    def __repr__(self) -> str:
        text = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return f"StreamResult({text!r}, {self.summary()})"


def stream_to_notebook(pieces: Iterable, show: bool = True) -> StreamResult:
    """Print each piece's `.text` as it arrives (live in a notebook), then a speed line; return the result."""
    start = time.perf_counter()
    first = None
    parts: list[str] = []
    tokens = 0
    reason = prompt_tokens = None
    for piece in pieces:
        text = getattr(piece, "text", piece if isinstance(piece, str) else "")
        if text:
            if first is None:
                first = time.perf_counter() - start
            parts.append(text)
            if show:
                print(text, end="", flush=True)
        tokens = getattr(piece, "generate_token_len", None) or tokens  # lmdeploy and labkit count cumulatively
        reason = getattr(piece, "finish_reason", None) or reason
        prompt_tokens = getattr(piece, "input_token_len", None) or prompt_tokens
    seconds = time.perf_counter() - start
    if not tokens:  # plain text pieces: count them
        tokens = sum(1 for p in parts if p)
    result = StreamResult("".join(parts), int(tokens), seconds, first, tokens / seconds if seconds > 0 else 0.0,
                          reason, prompt_tokens)
    if show:
        print(f"\n\n-- {result.summary()}", flush=True)
    return result


RESPONSE_FIELDS = ("generate_token_len", "input_token_len", "finish_reason", "index")


def responses_table(responses, text_chars: int | None = None, **columns):
    """lmdeploy Responses as a pandas table: the text, the Response fields and len(token_ids), one row each;
    `columns` adds columns (a list per column, one value per response) in front."""
    import pandas as pd

    if not isinstance(responses, (list, tuple)):
        responses = [responses]
    rows = []
    for r in responses:
        text = r.text if text_chars is None or len(r.text) <= text_chars else r.text[:text_chars] + "..."
        rows.append({"text": text, **{f: getattr(r, f) for f in RESPONSE_FIELDS},
                     "len(token_ids)": len(r.token_ids or [])})
    table = pd.DataFrame(rows)
    for i, (name, values) in enumerate(columns.items()):
        table.insert(i, name, list(values))
    return table


def refusals(attempts: dict[str, Callable[[], object]], errors: tuple[type[BaseException], ...] = (ValueError,)
             ) -> dict[str, str]:
    """Run each attempt, which should be refused with one of `errors`; print and return {what: message}.
    An attempt that is accepted is printed as such and left out, so a check on the keys catches it."""
    refused = {}
    width = max(map(len, attempts), default=0)
    for what, attempt in attempts.items():
        try:
            attempt()
        except errors as err:
            refused[what] = str(err)
            print(f"{what:>{width}}: {err}")
        else:
            print(f"{what:>{width}}: ACCEPTED (expected a refusal)")
    return refused
