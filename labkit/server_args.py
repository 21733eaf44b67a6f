"""The `lmdeploy serve api_server` command line for a set of checked options, and the name a model is served
under (what clients pass as `model=`). labkit.serve starts it; labs 02 and 07 print it."""
from __future__ import annotations

from pathlib import Path


def api_server_args(model_dir: str | Path, *, host: str, port: int, backend: str, model_name: str,
                    cache_ratio: float = 0.8, quant_policy: int = 0, session_len: int | None = None, tp: int = 1,
                    eager: bool = False, tool_call_parser: str | None = None, api_keys: list[str] | tuple = (),
                    log_level: str = "INFO", extra_args: list[str] | tuple = ()) -> list[str]:
    """The `lmdeploy serve api_server ...` command line (as a list) for these options."""
    argv = ["lmdeploy", "serve", "api_server", str(model_dir), "--server-name", host, "--server-port", str(port),
            "--backend", backend, "--model-name", model_name, "--cache-max-entry-count", str(cache_ratio),
            "--quant-policy", str(quant_policy), "--log-level", log_level.upper()]
    from labkit.backends import needs_remote_code

    if needs_remote_code(model_dir):  # as Engine does: lmdeploy 0.18 defaults --trust-remote-code to off
        argv.append("--trust-remote-code")
    if session_len is not None:
        argv += ["--session-len", str(session_len)]
    if tp != 1:
        argv += ["--tp", str(tp)]
    if eager:
        argv.append("--eager-mode")
    if tool_call_parser:
        argv += ["--tool-call-parser", tool_call_parser]
    if api_keys:
        argv += ["--api-keys", *api_keys]
    return argv + list(extra_args)


def served_name(model: str, model_dir: Path) -> str:
    """What clients call the model: the catalogue / generated / hub name, else the folder's name."""
    if model.startswith("generated:"):
        return model.split(":", 1)[1]
    path = Path(model).expanduser()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]  # a Hugging Face cache snapshot
    tail = model.rstrip("/").split("/")[-1]
    return tail if tail and not tail.startswith(".") else model_dir.name
