"""Function calling without `eval` (lab 02): tool schemas, a dispatch table that checks arguments,
the client loop that executes each tool call and sends the result back, and lmdeploy's own
tool-call parser applied to a model's text (what the api_server does with `--tool-call-parser`).

    run = run_tool_loop(server.client(), server.model_name, "Compute (3+5)*2")
    run.table()     # every message and tool call; run.answer, run.result (16)
    check_chain(run, 3, 5, 2)   # add(3,5), then mul(<add's result>, 2), then the answer: (what, ok, detail)

Without a GPU, `LocalClient(HFEngine(model))` stands in for the server's two steps around the model: the
request rendered as lmdeploy renders it, the reply read by lmdeploy's own tool-call parser.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from labkit.errors import InputError


def _schema(name: str, description: str) -> dict:
    """A tool of two numbers a and b, as an OpenAI function schema."""
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object",
                       "properties": {"a": {"type": "number", "description": "first number"},
                                      "b": {"type": "number", "description": "second number"}},
                       "required": ["a", "b"]}}}


TOOLS: list[dict] = [
    _schema("add", "Add two numbers: a + b"),
    _schema("mul", "Multiply two numbers: a * b"),
]


def add(a: float, b: float) -> float:
    """a + b."""
    return a + b


def mul(a: float, b: float) -> float:
    """a * b."""
    return a * b


# The dispatch table: the only functions a model can reach. Nothing the model writes is evaluated.
DISPATCH: dict[str, Callable[..., Any]] = {"add": add, "mul": mul}

# lmdeploy 0.18's --tool-call-parser names (lmdeploy/serve/parsers/tool_parser/*.py); a test checks them.
PARSERS = ("deepseek-v32", "deepseek-v4", "glm47", "intern-s1", "internlm", "interns2-preview", "kimi-k2",
           "kimi_k2", "llama3", "qwen", "qwen2d5", "qwen3", "qwen3coder")
# Model architecture (config.json) -> the parser that reads its tool calls.
_PARSER_BY_ARCH = {"InternLM2ForCausalLM": "internlm", "InternLM3ForCausalLM": "internlm",
                   "Qwen2ForCausalLM": "qwen", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3",
                   "LlamaForCausalLM": "llama3", "InternS1ForConditionalGeneration": "intern-s1"}


def check_parser(name: str) -> str:
    """The parser name itself, or a ValueError listing lmdeploy's."""
    if name not in PARSERS:
        raise InputError(f"unknown tool-call parser {name!r}: lmdeploy 0.18 has {', '.join(PARSERS)} "
                         f"(InternLM2.5: 'internlm'; Qwen2.5 / generated:tiny-chat: 'qwen'), or 'auto'")
    return name


def parser_for(model: str | Path, model_dir: str | Path | None = None) -> str | None:
    """The --tool-call-parser for a model, read from its folder (`model_dir`, or `model` if it is one): the
    architecture in config.json decides, not the name asked for (a course name that fell back to
    tiny-chat serves tiny-chat). Without a readable folder, the catalogue's; None if unknown."""
    from labkit.models import CATALOGUE

    folder = Path(model_dir) if model_dir is not None else Path(str(model)).expanduser()
    try:
        archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        entry = CATALOGUE.get(str(model))
        return entry.tool_parser if entry is not None else None
    return next((_PARSER_BY_ARCH[a] for a in archs if a in _PARSER_BY_ARCH), None)


def forced_for(model_dir: str | Path) -> bool:
    """True where the folder's model cannot decide to call tools (labkit's random-weight generated models,
    read from the marker labkit writes into them): lab 02 then forces each call (forced_rounds)."""
    from labkit.generate import random_weights

    return random_weights(model_dir)


# ----------------------------------------------------------------------------- dispatch

def _check_args(name: str, args: dict, tools: list[dict]) -> str | None:
    """What is wrong with `args` for tool `name` under its JSON schema (required, unknown, types), or None."""
    schema = next((t["function"].get("parameters", {}) for t in tools if t["function"]["name"] == name), {})
    props = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in args]
    extra = [k for k in args if props and k not in props]
    if missing or extra:
        return (f"missing {', '.join(missing)}" if missing else "") + \
               ("; " if missing and extra else "") + (f"unexpected {', '.join(extra)}" if extra else "")
    for key, value in args.items():
        want = props.get(key, {}).get("type")
        if want in ("number", "integer") and (isinstance(value, bool) or not isinstance(value, (int, float))
                                              or not math.isfinite(value)):
            return f"{key} must be a number, not {value!r}"
        if want == "integer" and isinstance(value, float) and not value.is_integer():
            return f"{key} must be a whole number, not {value!r}"
    return None


def call_tool(name: str, arguments: str | dict | None, tools: list[dict] = TOOLS,
              dispatch: dict[str, Callable[..., Any]] = DISPATCH) -> tuple[bool, Any]:
    """Run one tool call through the dispatch table: (True, value) or (False, a clear error message)."""
    if name not in dispatch or not any(t["function"]["name"] == name for t in tools):
        offered = sorted(set(dispatch) & {t["function"]["name"] for t in tools})
        return False, f"error: unknown function {name!r}; available: {', '.join(offered)}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            return False, f"error: the arguments of {name} are not valid JSON ({err.msg} at position {err.pos})"
    if not isinstance(arguments, dict):
        return False, f"error: the arguments of {name} must be a JSON object like {{\"a\": 1, \"b\": 2}}, " \
                      f"not {json.dumps(arguments)[:80]}"
    problem = _check_args(name, arguments, tools)
    if problem:
        return False, f"error: bad arguments for {name}: {problem}"
    value = dispatch[name](**arguments)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return True, value


# ----------------------------------------------------------------------------- lmdeploy's parser

_parser_classes: dict[str, type] = {}


def parse_reply(text: str, parser: str = "qwen", tools: list[dict] = TOOLS) -> dict:
    """What lmdeploy's api_server makes of a model's text with `--tool-call-parser parser`:
    {'content': plain text or None, 'tool_calls': [{'name', 'arguments'}]}. Needs no GPU."""
    check_parser(parser)
    from lmdeploy.serve.openai.protocol import ChatCompletionRequest
    from lmdeploy.serve.parsers.response_parser import BaseResponseParser

    cls = _parser_classes.get(parser)
    if cls is None:  # a subclass per parser: set_parsers writes class attributes
        cls = type(f"LabkitResponseParser_{parser}", (BaseResponseParser,), {})
        cls.set_parsers(tool_parser_name=parser)
        _parser_classes[parser] = cls
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "?"}], tools=tools)
    content, calls, _reasoning = cls(request).parse_complete(text)
    return {"content": content,
            "tool_calls": [{"name": c.function.name, "arguments": c.function.arguments} for c in calls or []]}


def server_view(messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
    """The messages and tools as lmdeploy's api_server hands them to the chat template (its own functions)."""
    from lmdeploy.serve.openai.protocol import ChatCompletionRequest
    from lmdeploy.serve.parsers.response_parser import normalize_chat_request
    from lmdeploy.serve.parsers.tool_parser.tool_parser import dump_tools

    with warnings.catch_warnings():  # lmdeploy's own deprecation note about max_tokens, once per request
        warnings.simplefilter("ignore", DeprecationWarning)
        req = dump_tools(normalize_chat_request(ChatCompletionRequest(model="m", messages=messages, tools=tools)))
    return req.messages, req.tools


class LocalClient:
    """`client.chat.completions.create(...)` on a local engine (HFEngine on CPU): the request rendered with
    lmdeploy's normalisation and the model's chat template, the reply parsed by lmdeploy's tool-call parser.
    What the api_server does around the model, without a server; sampling is the engine's own."""

    def __init__(self, engine, parser: str = "qwen"):
        from types import SimpleNamespace

        self.engine, self.parser = engine, check_parser(parser)
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    def create(self, model: str, messages: list[dict], tools: list[dict] | None = None, tool_choice: Any = "auto",
               temperature: float = 0.7, max_tokens: int = 256, top_p: float = 0.8, **_ignored: Any):
        """One chat completion, shaped like the openai client's (choices[0].message.content / .tool_calls)."""
        from types import SimpleNamespace as NS

        if tool_choice not in ("auto", "none", None):
            raise ValueError(f"tool_choice={tool_choice!r} needs guided decoding: use the api_server "
                             f"(labkit.serve.Server) for forced tool calls")
        msgs, offered = server_view(messages, tools if tool_choice != "none" else None)
        text = self.engine.tokenizer.apply_chat_template(msgs, tools=offered, tokenize=False,
                                                         add_generation_prompt=True)
        reply = self.engine.generate_text(text, skip_special_tokens=not offered, max_new_tokens=max_tokens,
                                          temperature=temperature, top_p=top_p)
        parsed = parse_reply(reply.text, self.parser, tools or TOOLS) if offered else \
            {"content": reply.text, "tool_calls": []}
        calls = [NS(id=f"call_{i}", type="function", function=NS(name=c["name"], arguments=c["arguments"]))
                 for i, c in enumerate(parsed["tool_calls"])]
        reason = "tool_calls" if calls else reply.finish_reason
        message = NS(role="assistant", content=parsed["content"], tool_calls=calls or None)
        return NS(choices=[NS(index=0, message=message, finish_reason=reason)],
                  usage=NS(prompt_tokens=reply.input_token_len, completion_tokens=reply.generate_token_len))


# ----------------------------------------------------------------------------- the loop

TOOL_TAGS = ("<tool_call>", "<|action_start|>", "<|plugin|>", "<|python_tag|>")


@dataclass
class ToolRun:
    """A function-calling conversation: the transcript, the final answer and the last tool result."""

    question: str
    transcript: list[dict] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    answer: str | None = None
    result: Any = None
    rounds: int = 0
    errors: int = 0  # tool calls that were not valid (unknown function, bad arguments, unparsable)
    calls: list[dict] = field(default_factory=list)  # {'name', 'arguments' (dict or None), 'result'} in order

    def note(self, round_: int, who: str, what: str, detail: str = "") -> None:
        """Add one line to the transcript."""
        self.transcript.append({"round": round_, "who": who, "what": what, "detail": detail})

    def table(self):
        """The transcript as a pandas table."""
        import pandas as pd

        return pd.DataFrame(self.transcript, columns=["round", "who", "what", "detail"])

    def as_dict(self) -> dict:
        """Plain dict, for evidence."""
        return {"question": self.question, "answer": self.answer, "result": self.result, "rounds": self.rounds,
                "errors": self.errors, "calls": self.calls, "transcript": self.transcript}


def _short(text: str | None, n: int = 160) -> str:
    text = (text or "").strip().replace("\n", " ")
    return text if len(text) <= n else text[:n - 3] + "..."


def run_tool_loop(client, model: str, question: str, tools: list[dict] = TOOLS, max_rounds: int = 5,
                  system: str | None = None, tool_choice: Any = "auto", rounds: list[dict] | None = None,
                  dispatch: dict[str, Callable[..., Any]] = DISPATCH, **request: Any) -> ToolRun:
    """Ask `question` with `tools`; execute every tool call via `dispatch`, send results back as role
    "tool", until the model answers in text or `max_rounds` pass. `rounds[i]` (or `rounds(i, run)`, built from
    the results so far) overrides request fields in round i (see forced_chain). Bad calls become transcript lines."""
    if not isinstance(max_rounds, int) or max_rounds < 1:
        raise InputError(f"max_rounds must be a whole number >= 1, not {max_rounds!r}")
    run = ToolRun(question)
    msgs: list[dict] = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": question}]
    run.note(0, "user", "asks", question)
    request.setdefault("temperature", 0.0)
    request.setdefault("max_tokens", 256)
    for i in range(max_rounds):
        run.rounds = i + 1
        over = rounds(i, run) if callable(rounds) else ((rounds or [])[i:i + 1] or [{}])[0]
        kwargs = {k: v for k, v in {"tools": tools, "tool_choice": tool_choice, **request, **over}.items()
                  if v is not None}  # None: not sent (the server's default), as the course's client did
        offered = kwargs.get("tools") or []
        reply = client.chat.completions.create(model=model, messages=msgs, **kwargs).choices[0]
        msg = reply.message
        calls = msg.tool_calls or []
        if not calls:
            text = msg.content or ""
            if any(tag in text for tag in TOOL_TAGS):
                run.errors += 1
                run.note(run.rounds, "labkit", "invalid tool call",
                         "the reply looks like a tool call that the server could not parse (start the server "
                         f"with the model's --tool-call-parser): {_short(text)}")
            elif not text.strip():
                run.note(run.rounds, "labkit", "empty reply",
                         f"no text and no tool call (finish_reason={reply.finish_reason}); lmdeploy drops calls "
                         "to functions that were not offered")
            else:
                run.note(run.rounds, "assistant", "answers", _short(text, 400))
            run.answer = text
            msgs.append({"role": "assistant", "content": text})
            break
        if msg.content and msg.content.strip():
            run.note(run.rounds, "assistant", "says", _short(msg.content))
        sent_calls, results = [], []
        for call in calls:
            name, args = call.function.name, call.function.arguments
            ok, value = call_tool(name, args, offered, dispatch)
            run.note(run.rounds, "assistant", f"calls {name}", args)
            try:
                parsed_args = json.loads(args) if isinstance(args, str) else args
            except json.JSONDecodeError:
                parsed_args = None
            run.calls.append({"name": name, "arguments": parsed_args, "result": value if ok else None})
            if ok:
                run.result = value
                run.note(run.rounds, "tool", f"{name} returns", json.dumps(value))
            else:
                run.errors += 1
                run.note(run.rounds, "labkit", "invalid tool call", value)
            # Echo the call back as valid JSON (the server re-parses it for the chat template).
            try:
                echoed = args if isinstance(json.loads(args or "{}"), dict) else "{}"
            except json.JSONDecodeError:
                echoed = "{}"
            sent_calls.append({"id": call.id, "type": "function", "function": {"name": name, "arguments": echoed}})
            results.append({"role": "tool", "tool_call_id": call.id, "name": name,
                            "content": json.dumps(value) if ok else value})
        msgs.append({"role": "assistant", "content": msg.content or "", "tool_calls": sent_calls})
        msgs.extend(results)
    else:
        run.note(run.rounds, "labkit", "stopped", f"no final answer after {max_rounds} rounds")
    run.messages = msgs
    return run


def check_chain(run: ToolRun, a: float, b: float, c: float) -> list[tuple[str, bool, str]]:
    """Lab 02's checks on a "Compute (a+b)*c" run: add(a, b) first, then mul whose first argument is add's
    *returned* value (not a number the model or a plan made up), then an answer that states (a+b)*c."""
    calls = run.calls
    first = calls[0] if calls else {}
    second = calls[1] if len(calls) > 1 else {}
    got = lambda call: f"{call.get('name')}({json.dumps(call.get('arguments'))}) -> {call.get('result')}" \
        if call else "no call"
    want = (a + b) * c
    want_s = str(int(want) if float(want).is_integer() else want)
    answer = run.answer or ""
    return [
        (f"the model called add({a}, {b}) first", first.get("name") == "add" and
         first.get("arguments") == {"a": a, "b": b}, got(first)),
        ("its next call was mul with the number add returned, and c", second.get("name") == "mul" and
         first.get("result") is not None and second.get("arguments") == {"a": first["result"], "b": c},
         f"add returned {first.get('result')}; then {got(second)}"),
        (f"it answered {want_s} = ({a}+{b})*{c}, with no invalid call", run.errors == 0 and
         re.search(rf"(?<![\d.]){re.escape(want_s)}(?![\d])", answer) is not None, f"answer {answer!r}"),
    ]


def report_chain(run: ToolRun, a: float, b: float, c: float, what: str, fix: str = "") -> None:
    """Lab 02's chain checks (add(a, b), mul with add's returned value and c, the answer) as labkit.check lines."""
    from labkit.notebook import check

    for name, ok, measured in check_chain(run, a, b, c):
        check(f"{what}: {name}", ok, measured, fix=fix)


def forced_call(name: str, args: dict, tools: list[dict] = TOOLS, max_tokens: int = 400) -> dict:
    """Request overrides that leave a model exactly one possible reply: the call `name(**args)`. One tool is
    offered whose JSON schema admits only these values (`enum`), with tool_choice="required", which lmdeploy
    enforces by guided decoding (xgrammar); sampling is opened up (temperature 1, top_p 1, top_k off) so the
    grammar's optional whitespace cannot trap the model. The server's parser and the dispatch stay real."""
    base = next(t for t in tools if t["function"]["name"] == name)
    fn = json.loads(json.dumps(base["function"]))
    for key, value in args.items():
        fn["parameters"]["properties"][key]["enum"] = [value]
    return {"tools": [{"type": "function", "function": fn}], "tool_choice": "required",
            "temperature": 1.0, "top_p": 1.0, "max_tokens": max_tokens,
            "extra_body": {"top_k": 0, "repetition_penalty": 1.0}}


def forced_rounds(calls: list[tuple[str, dict]], tools: list[dict] = TOOLS, max_tokens: int = 400) -> list[dict]:
    """Per-round overrides forcing exactly these calls, then a text answer (fixed calls: parser tests)."""
    return [forced_call(name, args, tools, max_tokens) for name, args in calls] + \
        [{"tool_choice": "none", "max_tokens": 32}]


def forced_chain(a: float, b: float, c: float, tools: list[dict] = TOOLS) -> Callable[[int, ToolRun], dict]:
    """For a model that cannot decide (random weights): the guided decoding -> parser -> dispatch round trip
    of "(a+b)*c", each round built from the previous result: add(a, b), then mul(<what add returned>, c),
    then the text "The answer is <what mul returned>." (forced_answer). It proves the plumbing, not the model's
    computation: a wrong tool result travels on into the answer, and the answer check fails."""
    def rounds(i: int, run: ToolRun) -> dict:
        last = run.calls[-1]["result"] if run.calls else None
        if i == 0:
            return forced_call("add", {"a": a, "b": b}, tools)
        if i == 1 and last is not None:
            return forced_call("mul", {"a": last, "b": c}, tools)
        if i == 2 and last is not None:
            return forced_answer(last)
        return {"tool_choice": "none", "max_tokens": 32}

    return rounds


def forced_answer(value: float) -> dict:
    """Request overrides that leave a model one possible text reply, "The answer is <value>.": a regex that
    lmdeploy enforces by guided decoding (response_format regex_schema), no tool call allowed."""
    shown = str(int(value)) if float(value).is_integer() else str(value)
    pattern = "The answer is " + shown.replace(".", r"\.") + r"\."
    return {"tool_choice": "none", "response_format": {"type": "regex_schema", "regex_schema": pattern},
            "temperature": 1.0, "top_p": 1.0, "max_tokens": 32, "extra_body": {"top_k": 0, "repetition_penalty": 1.0}}
