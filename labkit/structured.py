"""Structured output (lab 07): a JSON schema in `response_format`, the reply checked against it with jsonschema.

lmdeploy compiles the schema into a grammar (xgrammar) and masks, at every step, the tokens that would
break it: the reply parses and fits the schema whatever the weights, even on a random-weight model
(the values are nonsense there, the shape is not). Both engines do it (TurboMind and PyTorch).
"""
from __future__ import annotations

import json
from typing import Any
from labkit.errors import InputError

# The form the lab fills: a name and an age, nothing else. The bounds keep a random-weight model's reply
# short and plain: a name of 1-24 letters (no control characters) and an age of at most 3 digits. The
# grammar lmdeploy builds still allows any whitespace between the JSON tokens, so a model that never saw JSON
# can ramble in whitespace until max_tokens (on 2026-12-01 labkit's trained tiny-chat finished 0 of 8 replies
# within 768 tokens on either engine): a reply cut there is checked as what the grammar guarantees, the
# beginning of a document that fits (`follows_grammar`).
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "pattern": "^[A-Za-z][A-Za-z .'-]{0,23}$"},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
EXAMPLE_TEXT = "Ada Lovelace wrote the first program when she was 27. Extract her name and age as JSON."


class StructuredOutputError(InputError):
    """A reply that is not JSON, or JSON that does not fit the schema; the message says where."""


def check_schema(schema: dict) -> dict:
    """The schema itself if it is a valid JSON schema (draft 2020-12), else StructuredOutputError."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as err:
        raise StructuredOutputError(f"not a valid JSON schema: {err.message}; see https://json-schema.org") from None
    return schema


def response_format(schema: dict, name: str = "form") -> dict:
    """The OpenAI `response_format` for a JSON schema (what lmdeploy's api_server takes)."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": check_schema(schema)}}


def validate(text: str, schema: dict) -> Any:
    """The parsed reply if `text` is JSON that fits `schema`; StructuredOutputError (one line) otherwise."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise StructuredOutputError(f"the reply is not JSON ({err.msg} at character {err.pos}): "
                                    f"{text[:80]!r}") from None
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "the top level"
        raise StructuredOutputError(f"the reply does not fit the schema at {where}: {err.message}") from None
    return value


def follows_grammar(text: str, schema: dict = PERSON) -> str | None:
    """How `text` stands against the grammar lmdeploy builds from `schema` (xgrammar's, any whitespace between
    tokens): "complete" (a whole document that fits), "prefix" (the beginning of one: a reply cut at max_tokens),
    or None (no document that fits starts like this)."""
    import xgrammar as xgr

    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo(["<none>"]), cache_enabled=False).compile_grammar(
        xgr.Grammar.from_json_schema(json.dumps(check_schema(schema))))
    matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
    if not matcher.accept_string(text):
        return None
    return "complete" if matcher.is_terminated() else "prefix"


def ask(server: Any, text: str = EXAMPLE_TEXT, schema: dict = PERSON, max_tokens: int = 256,
        temperature: float = 0.7, constrained: bool = True, model: str | None = None) -> dict:
    """Ask for `schema`-shaped JSON (constrained=False: the same request without response_format, for
    comparison); {reply, valid, grammar (follows_grammar), value or error, tokens, finish}."""
    from labkit.webui import list_models, openai_base
    from labkit.serve import openai_client

    url, key = openai_base(server)
    client = openai_client(url, key)
    model = model or getattr(server, "model_name", None) or list_models(server)[0]
    extra = {"response_format": response_format(schema)} if constrained else {}
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                           max_tokens=max_tokens, temperature=temperature, **extra)
    choice = reply.choices[0]
    out = {"constrained": constrained, "reply": choice.message.content or "", "finish": choice.finish_reason,
           "tokens": reply.usage.completion_tokens if reply.usage else None}
    out["grammar"] = follows_grammar(out["reply"], schema)
    try:
        out["value"], out["valid"], out["error"] = validate(out["reply"], schema), True, None
    except StructuredOutputError as err:
        out["value"], out["valid"], out["error"] = None, False, str(err)
    return out


def trials(server: Any, n: int = 5, **kwargs: Any):
    """`ask` n times with and n times without response_format, all at once: a table (how often the reply fits)."""
    from concurrent.futures import ThreadPoolExecutor

    import pandas as pd

    with ThreadPoolExecutor(max_workers=max(1, 2 * n)) as pool:
        rows = list(pool.map(lambda c: ask(server, constrained=c, **kwargs), [True] * n + [False] * n))
    return pd.DataFrame(rows, columns=["constrained", "valid", "grammar", "reply", "value", "error", "tokens",
                                       "finish"])


def summary(table) -> dict:
    """How many replies fit, with and without the schema: valid documents, and replies the grammar accepts
    (whole or cut at max_tokens). Constrained decoding holds when every constrained reply follows the grammar."""
    con, free = table[table["constrained"]], table[~table["constrained"]]
    finished = con[con["finish"] == "stop"]
    return {"asked": len(con), "constrained valid": int(con["valid"].sum()),
            "constrained following the grammar": int(con["grammar"].notna().sum()),
            "constrained cut at max_tokens": int((con["finish"] == "length").sum()),
            "constrained finished": len(finished), "constrained finished and valid": int(finished["valid"].sum()),
            "unconstrained valid": int(free["valid"].sum()),
            "unconstrained following the grammar": int(free["grammar"].notna().sum())}


def holds(s: dict) -> bool:
    """Lab 07's check on a `summary`: every constrained reply follows the grammar, every finished one is valid."""
    return (s["asked"] > 0 and s["constrained following the grammar"] == s["asked"]
            and s["constrained finished and valid"] == s["constrained finished"])
