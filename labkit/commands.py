"""The course's commands, then and now: every command, flag, API argument and message format of the 2024
lesson (lmdeploy 0.2-0.5) next to its lmdeploy 0.18 form, each run for real.

`ROWS` holds the table as data. `run(form)` runs one form: a `lmdeploy ...` line is parsed by lmdeploy's own
CLI parser (nothing starts; the error is lmdeploy's own), a Python form is executed with lmdeploy imported
(`{model}` is a model folder). `table()` runs every row (lab 00), `markdown()` writes docs/commands.md,
and tests/test_commands.py runs each old form through the real `lmdeploy` command as well.
Versions in `changed` come from lmdeploy's git history (the commit that changed it, its first release);
"by 0.18" where that was not traced.
"""
from __future__ import annotations

import contextlib
import io
import shlex
from dataclasses import dataclass
from pathlib import Path

TEST = "tests/test_commands.py::test_every_row_runs"
CHAT_GPU = TEST + "; tests/test_chat_cli.py (gpu, both backends)"


@dataclass(frozen=True)
class Row:
    """One course command, its current form, and where and how it changed."""

    topic: str
    then: str       # as the 2024 lesson (or its notes) gave it
    now: str        # the lmdeploy 0.18 form
    changed: str    # "v0.10.0 (#3813)": the first release with the change; "by 0.18" where not traced
    today: str      # what the old form does on lmdeploy 0.18
    test: str = TEST  # the test that runs the current form (the old one too, where it can run here)


M = "{model}"
ROWS: tuple[Row, ...] = (
    Row("install", "pip install lmdeploy[all]", "pip install lmdeploy",
        "by 0.18", "still works: the extras 'all', 'lite', 'serve' exist; the plain install already serves",
        "tests/test_commands.py::test_every_row_runs (the extras read from the installed package)"),
    Row("offline conversion", "lmdeploy convert internlm2-chat-7b <model>", f"lmdeploy chat {M} --backend turbomind",
        "v0.10.0 (#3813)", "fails: 'convert' is no longer a command; TurboMind reads Hugging Face weights directly",
        CHAT_GPU),
    Row("chat, TurboMind", "lmdeploy chat turbomind ./workspace", f"lmdeploy chat {M} --backend turbomind",
        "v0.5.1 (#1899)", "fails: the 'chat turbomind|torch' sub-commands are gone; the backend is a flag", CHAT_GPU),
    Row("chat, template name", f"lmdeploy chat {M} --model-name internlm2-chat-7b",
        f"lmdeploy chat {M} --chat-template template.json",
        "v0.6.0 (#1931)", "fails: chat has no --model-name; the template is --chat-template (default: the tokenizer's)"),
    Row("chat, PyTorch engine", f"lmdeploy chat {M} --backend pytorch", f"lmdeploy chat {M} --backend pytorch",
        "unchanged", "works (on a CUDA GPU; without one it ends in a CUDA error, see lab 01)",
        CHAT_GPU + "; tests/test_commands.py::test_lmdeploy_chat_on_cpu_ends_in_the_cuda_error_lab_01_warns_of"),
    Row("API server", f"lmdeploy serve api_server {M} --model-name internlm2 --server-name 0.0.0.0 "
        "--server-port 23333 --tp 1",
        f"lmdeploy serve api_server {M} --model-name internlm2 --server-name 0.0.0.0 --server-port 23333 --tp 1 "
        "--trust-remote-code", "v0.13.0 (#4511)",
        "works; but InternLM2.5 loads remote code, which lmdeploy now runs only with --trust-remote-code (default off)"),
    Row("command-line client", "lmdeploy serve api_client http://localhost:23333",
        "openai.OpenAI(base_url='http://localhost:23333/v1', api_key='none')", "v0.10.0 (#3830)",
        "fails: 'serve' has only api_server and proxy; use the OpenAI client, curl, or demo/app.py",
        "tests/test_demo.py (the OpenAI client against a real server)"),
    Row("web UI over the server", "lmdeploy serve gradio http://localhost:23333 --server-port 6006",
        "python demo/app.py --server http://localhost:23333/v1 --port 6006", "v0.10.0 (#3829)",
        "fails: lmdeploy serves no Gradio UI any more; the workbook's demo/ app is the replacement",
        "tests/test_demo.py"),
    Row("web UI over a model", f"lmdeploy serve gradio {M}",
        f"lmdeploy serve api_server {M}  +  python demo/app.py", "v0.10.0 (#3829)",
        "fails, as above", "tests/test_demo.py"),
    Row("AWQ calibration data", f"lmdeploy lite auto_awq {M} --calib-dataset ptb --work-dir <out>",
        f"lmdeploy lite auto_awq {M} --calib-dataset wikitext2 --work-dir <out>", "v0.12.0 (#4256)",
        "fails: ptb is not a choice; every choice is downloaded from a hub (labkit.quant calibrates offline)"),
    Row("AWQ settings", f"lmdeploy lite auto_awq {M} --calib-samples 128 --calib-seqlen 2048 --w-bits 4 "
        "--w-group-size 128 --batch-size 1 --work-dir <out>", f"lmdeploy lite auto_awq {M} --calib-samples 128 "
        "--calib-seqlen 2048 --w-bits 4 --w-group-size 128 --batch-size 1 --work-dir <out>", "unchanged",
        "works (lab 03 runs labkit's offline calibration with the same settings)"),
    Row("AWQ scale search", f"lmdeploy lite auto_awq {M} --search-scale False --work-dir <out>",
        f"lmdeploy lite auto_awq {M} --work-dir <out>", "v0.6.3 (#2725)",
        "fails: --search-scale is a switch and takes no value (in 0.4.2-0.6.2, type=bool made 'False' mean True)"),
    Row("AWQ model format", f"lmdeploy chat {M} --model-format awq", f"lmdeploy chat {M}", "v0.5.0 (#1799)",
        "accepted but not needed: the engine reads quantization_config from the AWQ folder's config.json"),
    Row("KV int8, offline", f"lmdeploy lite kv_qparams {M} ./workspace/triton_models/weights",
        f"lmdeploy serve api_server {M} --quant-policy 8", "v0.6.0 (#1931)",
        "fails: KV quantization is online now, no calibration step"),
    Row("KV policy 4", f"lmdeploy serve api_server {M} --quant-policy 4",
        f"lmdeploy serve api_server {M} --quant-policy 8", "v0.4.0 (#1377)",
        "accepted, but means int4 now: before 0.4.0, 4 meant int8 KV (camp 1); int8 is 8"),
    Row("KV policies of 0.18", "(none)", f"lmdeploy serve api_server {M} --backend pytorch --quant-policy 16",
        "42: v0.13.0 (#4510); 16, 17: v0.14.0 (#4563)",
        "16/17 = FP8, 42 = TurboQuant, both PyTorch engine only (TurboMind: no FP8; 42 would run as int8); lab 04",
        TEST + "; tests/test_kvcache.py (bytes vs lmdeploy's cache plan); notebooks/04_kv_cache.ipynb (gpu)"),
    Row("KV cache ratio", f"lmdeploy serve api_server {M} --cache-max-entry-count 0.4",
        f"lmdeploy serve api_server {M} --cache-max-entry-count 0.4", "v0.2.2 (docs/en/llm/pipeline.md)",
        "accepted; in 0.2.0-0.2.1 a share of the total GPU memory, now of the memory free after the weights",
        "tests/test_kvcache.py::test_predict_matches_lmdeploys_executor"),
    Row("the course's tiny KV cache", f"lmdeploy serve api_server {M} --cache-max-entry-count 0.01",
        f"lmdeploy serve api_server {M} --cache-max-entry-count 0.01", "unchanged",
        "works (the PyTorch engine refuses 1.0 and above); lab 04's full profile runs it",
        TEST + "; notebooks/04_kv_cache.ipynb (gpu, full profile)"),
    Row("engine config", "TurbomindEngineConfig(cache_max_entry_count=0.2, session_len=8192)",
        "TurbomindEngineConfig(cache_max_entry_count=0.2, session_len=8192)", "unchanged",
        "works; PytorchEngineConfig takes the same two"),
    Row("engine config, model format", "TurbomindEngineConfig(model_format='awq')", "TurbomindEngineConfig()",
        "v0.5.0 (#1799)", "accepted but not needed (read from the model's config.json)"),
    Row("generation config", "GenerationConfig(max_new_tokens=256, top_p=0.8, top_k=40, temperature=0.8, "
        "repetition_penalty=1.05)", "GenerationConfig(max_new_tokens=256, top_p=0.8, top_k=40, temperature=0.8, "
        "repetition_penalty=1.05)", "unchanged", "works"),
    Row("response fields", "Response(text='', generate_token_len=0, input_token_len=0, finish_reason='length')",
        "Response(text='', generate_token_len=0, input_token_len=0, finish_reason='error', "
        "error_code='context_length_exceeded')", "v0.16.0 (#4856)",
        "works; a refused request now also says why (error_code, error_message: lab 05's trap)",
        TEST + "; tests/test_vision_engines.py"),
    Row("images", "from lmdeploy.vl import load_image", "from lmdeploy.vl import load_image", "unchanged",
        "works (labkit.vision.load adds clear errors for bad files; lab 05 shows both give the same pixels)"),
    Row("chat template by name", "ChatTemplateConfig(model_name='internlm2')",
        "ChatTemplateConfig(model_name='hf', model_path='{model}')  # or leave it out", "v0.10.0 (#3845)",
        "accepted but silently wrong: 'internlm2' is no longer a template, the prompt goes in bare "
        "(only a log line warns); the tokenizer's own template is the default"),
    Row("system prompt", "ChatTemplateConfig(model_name='internlm2', meta_instruction='You are a pirate.')",
        "[{'role': 'system', 'content': 'You are a pirate.'}, {'role': 'user', 'content': ...}]", "v0.10.0 (#3845)",
        "accepted, but the prompt gets no template at all (system text glued to the question); send a system message"),
    Row("tool result message", "{'role': 'environment', 'name': 'plugin', 'content': '8'}",
        "{'role': 'tool', 'tool_call_id': <the call's id>, 'content': '8'}", "v0.6.0 (#2147)",
        "accepted, but the template writes a bare 'environment' turn the model does not expect"),
    Row("function calling server", f"lmdeploy serve api_server {M}",
        f"lmdeploy serve api_server {M} --tool-call-parser internlm", "v0.7.2 (#3198: --tool-call-parser)",
        "starts, but without --tool-call-parser the reply's tool calls stay plain text (lab 02)",
        TEST + "; notebooks/02_serving.ipynb (gpu)"),
    Row("vision models", "pipeline('internlm/internlm-xcomposer2-vl-7b')", "pipeline('OpenGVLab/InternVL3-1B-hf')",
        "v0.15.0 (#4693)", "fails: XComposer2 support was removed; LLaVA (LlavaLlamaForCausalLM) still matches, "
        "with the LLaVA repository installed", "notebooks/05_vision.ipynb"),
)


@dataclass(frozen=True)
class Outcome:
    """What lmdeploy 0.18 did with one form: accepted or not, and what it said."""

    ok: bool
    said: str


_PARSER: dict = {}


def parser():
    """lmdeploy 0.18's own `lmdeploy` argument parser, with every sub-command (built once)."""
    if "p" not in _PARSER:
        from lmdeploy.cli.cli import CLI
        from lmdeploy.cli.lite import SubCliLite
        from lmdeploy.cli.serve import SubCliServe

        if "chat" not in CLI.subparsers.choices:
            CLI.add_parsers()
        for name, add in (("api_server", SubCliServe.add_parser_api_server), ("proxy", SubCliServe.add_parser_proxy)):
            if name not in SubCliServe.subparsers.choices:  # each on its own: another caller may have added one
                add()
        if "auto_awq" not in SubCliLite.subparsers.choices:
            SubCliLite.add_parsers()
        _PARSER["p"] = CLI.parser
    return _PARSER["p"]


def parse(command: str):
    """(Outcome, argparse namespace or None) for an `lmdeploy ...` line, parsed by lmdeploy's parser; runs nothing."""
    argv = shlex.split(command)
    if not argv or argv[0] != "lmdeploy":
        raise ValueError(f"not an lmdeploy command line: {command!r}")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = parser().parse_args(argv[1:])
    except SystemExit:
        lines = [line for line in err.getvalue().strip().splitlines() if line.strip()]
        return Outcome(False, lines[-1] if lines else "rejected"), None
    return Outcome(True, "accepted"), args


def _namespace(model: str) -> dict:
    import lmdeploy
    from lmdeploy import ChatTemplateConfig, GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig

    from lmdeploy.messages import Response

    return {"lmdeploy": lmdeploy, "Response": Response, "ChatTemplateConfig": ChatTemplateConfig, "GenerationConfig": GenerationConfig,
            "TurbomindEngineConfig": TurbomindEngineConfig, "PytorchEngineConfig": PytorchEngineConfig,
            "model": model}


def run(form: str, model: str | Path = "<model>") -> Outcome:
    """Run one form: a `lmdeploy` line through lmdeploy's parser, else Python (configs, messages); no engine starts."""
    form = form.replace(M, str(model))
    if form.startswith("lmdeploy "):
        return parse(form.split("  +  ")[0])[0]
    if form.startswith("pip install lmdeploy"):
        from importlib import metadata

        extra = form.partition("[")[2].partition("]")[0]
        extras = metadata.metadata("lmdeploy").get_all("Provides-Extra") or []
        ok = not extra or extra in extras
        return Outcome(ok, f"extras of lmdeploy {metadata.version('lmdeploy')}: {', '.join(extras)}")
    if form.startswith("python demo/app.py"):
        return Outcome(True, "runs the workbook's demo app (tests/test_demo.py starts it)")
    if form.startswith("openai."):
        import openai

        client = eval(form, {"openai": openai})  # noqa: S307 - our own table's text, never user input
        return Outcome(True, f"client for {client.base_url}")
    if form.startswith("from lmdeploy"):
        try:
            exec(form, {})  # noqa: S102 - our own table's text, never user input
        except ImportError as err:
            return Outcome(False, f"ImportError: {err}")
        return Outcome(True, "imports")
    if form.startswith("pipeline("):
        return _vision_outcome(form)
    if form == "(none)":
        return Outcome(True, "nothing to run: new in 0.18")
    code = form.split("  #")[0].replace("<the call's id>", "'call_1'").replace("...", "'Hi'")
    try:
        value = eval(code, _namespace(str(model)))  # noqa: S307 - our own table's text, never user input
    except Exception as err:  # lmdeploy's own error, shown as the old form's outcome
        detail = err.errors()[0].get("msg", "") if hasattr(err, "errors") else str(err).splitlines()[0]  # pydantic
        return Outcome(False, f"{type(err).__name__}: {detail}")
    if not (Path(str(model)) / "config.json").is_file():
        return Outcome(True, f"{type(value).__name__} built")
    try:
        return _prompt_outcome(value, model)
    except Exception as err:  # the form was built; only showing its prompt failed (e.g. no chat template)
        return Outcome(True, f"{type(value).__name__} built (prompt not shown: {type(err).__name__}: {err})"[:300])


HI = [{"role": "user", "content": "Hi"}]
TOOL_TURNS = [{"role": "user", "content": "(3+5)*2?"},
              {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                  "name": "add", "arguments": {"a": 3, "b": 5}}}]}]


def _prompt_outcome(value, model) -> Outcome:
    """For a template config or a message: the prompt lmdeploy builds with it on `model`."""
    from lmdeploy import ChatTemplateConfig

    if isinstance(value, ChatTemplateConfig):
        return Outcome(True, f"prompt for 'Hi': {render(HI, model, value)!r}")
    if isinstance(value, list):
        return Outcome(True, f"prompt: {render(value, model)!r}")
    if isinstance(value, dict) and value.get("role") in ("tool", "environment"):
        prompt = render(TOOL_TURNS + [value], model)
        return Outcome(True, f"the tool result in the prompt: {prompt[prompt.rfind('<|im_end|>', 0, -30) + 11:]!r}")
    return Outcome(True, f"{type(value).__name__} built")


def _vision_outcome(form: str) -> Outcome:
    """Whether lmdeploy 0.18 still has a vision model class for the checkpoint a pipeline(...) line names."""
    from lmdeploy.vl.model.builder import VISION_MODELS

    name = form.split("'")[1].lower()
    known = {n.lower() for n in VISION_MODELS.module_dict}
    if "xcomposer" in name:
        hit = any("xcomposer" in n for n in known)
        return Outcome(hit, "a vision model class for XComposer2: " + ("found" if hit else "none in lmdeploy.vl.model"))
    hit = any("internvl" in n for n in known)
    return Outcome(hit, "InternVL vision model classes: " + ("found" if hit else "none"))


def render(messages: list[dict], model: str | Path, config=None) -> str:
    """The prompt lmdeploy builds from `messages` for the model (its chat template, or `config`'s)."""
    from lmdeploy.model import get_chat_template

    from labkit.backends import needs_remote_code

    remote = needs_remote_code(model)  # InternLM2.5's tokenizer is remote code, as lmdeploy loads it with the flag
    with contextlib.redirect_stderr(io.StringIO()):
        return get_chat_template(str(model), config, trust_remote_code=remote).messages2prompt(messages)


def run_row(row: Row, model: str | Path = "<model>") -> dict:
    """One row of the table with both forms run: what lmdeploy 0.18 said to each."""
    then, now = run(row.then, model), run(row.now, model)
    said = ("accepted" if then.ok else "FAILS: ") + ("" if then.said == "accepted" else
                                                     (": " if then.ok else "") + then.said)
    return {"topic": row.topic, "then (2024)": row.then.replace(M, "<model>"), "lmdeploy 0.18 on it": said,
            "now": row.now.replace(M, "<model>"),
            "now runs": "yes" if now.ok else f"NO: {now.said}", "changed in": row.changed, "what it does now": row.today}


def table(model: str | Path = "<model>"):
    """Every row run (both forms, lmdeploy's own answers), as a DataFrame: lab 00's 'then and now'."""
    import pandas as pd

    return pd.DataFrame([run_row(r, model) for r in ROWS])


def markdown(model: str | Path = "<model>") -> str:
    """docs/commands.md: the table with lmdeploy's own answers to the old forms, each row's test, and the note."""
    out = ["# The course's commands, then and now", "",
           "Generated by `python -m labkit.commands > docs/commands.md` from `labkit/commands.py`; "
           "`tests/test_commands.py` checks it is current and runs every row. \"lmdeploy 0.18 says\" is lmdeploy's "
           "own answer (its CLI parser, or the Python call; prompts rendered with a generated ChatML model), run on "
           "lmdeploy 0.18.0. Versions come from "
           "lmdeploy's git history (the commit, then its first release); \"by 0.18\" where not traced.", "",
           "| topic | then (2024) | lmdeploy 0.18 says | now | changed in | what the old form does now | test |",
           "|---|---|---|---|---|---|---|"]
    for row in ROWS:
        r = run_row(row, model)
        cells = [r["topic"], f"`{r['then (2024)']}`", r["lmdeploy 0.18 on it"], f"`{r['now']}`", row.changed, row.today,
                 f"`{row.test}`"]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    out += ["", "## Where each row runs", "",
            "- **CPU (CI, `make test`)**: every `lmdeploy ...` form, old and new, through lmdeploy's own parser; "
            "the old forms that fail also through the real `lmdeploy` command, its exit status 2 and error "
            "compared; the config objects (`TurbomindEngineConfig`, `PytorchEngineConfig`, `GenerationConfig`, "
            "`ChatTemplateConfig`) built; the chat templates rendered on a generated model; the KV ratio's "
            "meaning against lmdeploy's executor arithmetic; the demo app against a real OpenAI-compatible "
            "server (a FastAPI server over the transformers baseline).",
            "- **GPU machine (`scripts/gpu-suite.sh`)**: the current forms that need an engine: `lmdeploy chat` "
            "on both backends (tests/test_chat_cli.py, lab 01), `lmdeploy serve api_server` with "
            "`--tool-call-parser` (lab 02), `--quant-policy 4/8/16/42` and `--cache-max-entry-count 0.01` "
            "(lab 04), InternVL in the pipeline (lab 05), the demo app against `lmdeploy serve api_server` "
            "(tests/test_demo.py, marked gpu).", ""]
    return "\n".join(out)


def docs() -> str:
    """docs/commands.md as `python -m labkit.commands` writes it: prompts rendered on generated:tiny-chat."""
    from labkit.models import resolve

    model = resolve("generated:tiny-chat")
    return markdown(model).replace(str(model), "<model>")


if __name__ == "__main__":
    print(docs(), end="")


def chat_commands(model_dir: str | Path):
    """`lmdeploy chat` for each backend: the command where it can run here, else why not (a table)."""
    import pandas as pd

    from labkit.engine import chat_command
    from labkit.errors import EngineError
    from labkit.gpu import has_cuda

    rows, gpu = [], has_cuda()
    for backend in ("turbomind", "pytorch"):
        try:
            rows.append({"backend": backend, "command": chat_command(model_dir, backend),
                         "runs here": "yes" if gpu else "no: no CUDA GPU, it ends in a CUDA error"})
        except EngineError as err:
            rows.append({"backend": backend, "command": "", "runs here": f"no: {err}"})
    if not gpu:
        print("No CUDA GPU here: `lmdeploy chat` needs one. Typed in a terminal it loads for a while, then ends in "
              "a long traceback whose last line is `RuntimeError: Found no NVIDIA driver on your system` "
              "(tests/test_commands.py runs it). Run it on the GPU machine.")
    return pd.DataFrame(rows)


def template_table(model_dir: str | Path, question: str = "Who are you?", system: str = "You are a pirate."):
    """The prompt lmdeploy builds for one question under each chat-template choice (a table; nothing runs)."""
    import pandas as pd
    from lmdeploy import ChatTemplateConfig

    user = [{"role": "user", "content": question}]
    custom = ChatTemplateConfig(model_name="lab-chatml", system="<|im_start|>system\n", meta_instruction=system,
                                eosys="<|im_end|>\n", user="<|im_start|>user\n", eoh="<|im_end|>\n",
                                assistant="<|im_start|>assistant\n", eoa="<|im_end|>", separator="\n")
    cases = [("default: the model's own template (tokenizer_config.json)", user, None),
             ("a system message (the current way to set a system prompt)",
              [{"role": "system", "content": system}] + user, None),
             ("ChatTemplateConfig(model_name='internlm2'): the 2024 code", user, ChatTemplateConfig("internlm2")),
             ("ChatTemplateConfig(model_name='internlm2', meta_instruction=...): 2024", user,
              ChatTemplateConfig("internlm2", meta_instruction=system)),
             ("a full custom ChatTemplateConfig (every marker given)", user, custom)]
    return pd.DataFrame([{"chat template": what, "prompt lmdeploy builds": render(msgs, model_dir, cfg)}
                         for what, msgs, cfg in cases])
