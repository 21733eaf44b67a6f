"""Small random-weight models that labkit builds locally, for tests and offline use.

`ensure("tiny-chat")` returns a cached folder that transformers and lmdeploy load like any
Hugging Face model: Qwen2 architecture, seeded random weights (bf16), a byte-level BPE tokenizer
trained with `tokenizers` on the text labkit ships (vocab padded to exactly the model's), and a
ChatML chat template. The text they produce is nonsense; behaviour, memory and speed are real.
Used by every lab's tests; `bench-1.5b` (Qwen2-1.5B shape) by the speed work of labs 01, 03, 04.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from labkit import config

FORMAT_VERSION = 1  # bump when the files a generated model holds change

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML with tools, close to Qwen2.5's, so lmdeploy's `qwen` tool-call parser applies (lab 02).
CHAT_TEMPLATE = (
    "{% set nl = '\\n' %}"
    "{% if tools %}{{ '<|im_start|>system' + nl }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + nl + nl }}{% endif %}"
    "{{ '# Tools' + nl + nl + 'You may call one or more functions to assist with the user query.' + nl + nl }}"
    "{{ 'You are provided with function signatures within <tools></tools> XML tags:' + nl + '<tools>' }}"
    "{% for tool in tools %}{{ nl + (tool | tojson) }}{% endfor %}"
    "{{ nl + '</tools>' + nl + nl + 'For each function call, return a json object with function name and '"
    " + 'arguments within <tool_call></tool_call> XML tags:' + nl + '<tool_call>' + nl"
    " + '{\"name\": <function-name>, \"arguments\": <args-json-object>}' + nl + '</tool_call><|im_end|>' + nl }}"
    "{% elif messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system' + nl + messages[0]['content'] + '<|im_end|>' + nl }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and loop.first %}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user' + nl + '<tool_response>' + nl + message['content'] + nl + '</tool_response><|im_end|>' + nl }}"
    "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{ '<|im_start|>assistant' + nl + (message['content'] or '') }}"
    "{% for tc in message['tool_calls'] %}{% set f = tc['function'] if tc.get('function') else tc %}"
    "{{ nl + '<tool_call>' + nl + '{\"name\": \"' + f['name'] + '\", \"arguments\": ' }}"
    "{{ f['arguments'] if f['arguments'] is string else (f['arguments'] | tojson) }}{{ '}' + nl + '</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>' + nl }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + nl }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}{{ '<IMAGE_TOKEN>' }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>' + nl }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant' + nl }}{% endif %}"
)


@dataclass(frozen=True)
class Spec:
    """The shape of a generated Qwen2-architecture model."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int = 8192
    tie_embeddings: bool = True
    seed: int = 0
    about: str = ""


SPECS: dict[str, Spec] = {
    "tiny-chat": Spec(hidden=256, intermediate=768, layers=2, heads=4, kv_heads=2, vocab=4096,
                      about="2 layers, ~3M parameters: tests and offline runs (seconds to build)"),
    "bench-1.5b": Spec(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, vocab=151936,
                       max_positions=32768,
                       about="Qwen2-1.5B shape (~1.5B parameters, ~3 GB bf16): speed and memory work"),
}


# Builders registered by other modules: name -> (version, build(dir)). Modules in _PLUGINS
# register theirs when imported (lab 05's tiny-vl lives with the vision code, tiny-internlm2 in
# labkit.internlm2). A builder may return a dict of fields for the folder's marker file.
_EXTRA: dict[str, tuple[int, object]] = {}
_ABOUT: dict[str, str] = {}
_PLUGINS = ("labkit.vision", "labkit.internlm2")
MARKER = "labkit-generated.json"  # in every generated folder: what labkit built, read by info()


def _load_plugins() -> None:
    import importlib

    for mod in _PLUGINS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise


def available() -> list[str]:
    """Names that `generated:NAME` accepts."""
    _load_plugins()
    return sorted(SPECS) + sorted(_EXTRA)


def register(name: str, version: int, build, about: str = "") -> None:
    """Register another generated model (lab 05's vision-language model, tiny-internlm2, trained models)."""
    _EXTRA[name] = (version, build)
    if about:
        _ABOUT[name] = about


def about(name: str) -> str:
    """One line on what generated model `name` is for."""
    return SPECS[name].about if name in SPECS else _ABOUT.get(name, "")


def info(model_dir: str | Path) -> dict | None:
    """What labkit wrote into a generated model's folder (its marker), or None for any other folder."""
    try:
        return json.loads((Path(model_dir) / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def random_weights(model_dir: str | Path) -> bool:
    """True for a folder labkit generated with random weights (it writes nonsense, calls no tools)."""
    found = info(model_dir)
    return found is not None and bool(found.get("random_weights", True))


def model_dir(name: str) -> Path:
    """Where the generated model `name` is cached."""
    version = FORMAT_VERSION if name in SPECS else _EXTRA[name][0]
    return config.home() / "generated" / f"{name}-v{version}"


def ensure(name: str, quiet: bool = False) -> Path:
    """The folder of generated model `name`, built once and cached under LABKIT_HOME."""
    if name not in SPECS and name not in _EXTRA:
        _load_plugins()
    if name not in SPECS and name not in _EXTRA:
        from labkit.models import ModelNotFoundError

        raise ModelNotFoundError(f"no generated model called {name!r}; choose one of {available()}")
    target = model_dir(name)
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    start = time.perf_counter()
    try:
        marker = {"name": name, "spec": asdict(SPECS[name]) if name in SPECS else None, "random_weights": True}
        if name in SPECS:
            build_chat_model(SPECS[name], tmp)
        else:
            marker.update(_EXTRA[name][1](tmp) or {})
        marker["seconds"] = round(time.perf_counter() - start, 1)
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        print(f"generated {name} in {time.perf_counter() - start:.1f} s -> {target}")
    return target


def train_tokenizer(vocab_size: int, out_dir: Path):
    """A byte-level BPE tokenizer trained on labkit's corpus, padded to exactly `vocab_size`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 8192), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    text = config.data_file("corpus.txt").read_text(encoding="utf-8").split("\n\n")
    tok.train_from_iterator(text, trainer)
    # Pad the vocabulary with reserved entries so it matches the model's embedding rows.
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    nxt = len(vocab)
    while nxt < vocab_size:
        vocab[f"<|reserved_{nxt}|>"] = nxt
        nxt += 1
    tok = Tokenizer.from_str(json.dumps(data))
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    return save_chatml_tokenizer(tok, out_dir)


def save_chatml_tokenizer(tok, out_dir: Path):
    """Save a `tokenizers.Tokenizer` as a ChatML (Qwen2-style) fast tokenizer with its chat template; return it."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, model_max_length=32768)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    template_in_tokenizer_config(out_dir, CHAT_TEMPLATE, tokenizer_class="PreTrainedTokenizerFast")
    return fast


def template_in_tokenizer_config(out_dir: Path, template: str, tokenizer_class: str | None = None) -> None:
    """Keep the chat template in tokenizer_config.json too (older loaders look for it there)."""
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("chat_template", template)
    if tokenizer_class is not None:
        cfg["tokenizer_class"] = tokenizer_class
    cfg_path.write_text(json.dumps(cfg, indent=1, ensure_ascii=False))


def save_generation_config(out_dir: Path, tok) -> None:
    """Write generation_config.json: stop at <|im_end|> or <|endoftext|>, Qwen2.5's sampling defaults."""
    from transformers import GenerationConfig

    end, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    GenerationConfig(bos_token_id=end, eos_token_id=[im_end, end], pad_token_id=end, do_sample=True,
                     temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05).save_pretrained(out_dir)


def build_chat_model(spec: Spec, out_dir: Path) -> None:
    """Write a Qwen2 model of shape `spec` with seeded random bf16 weights to `out_dir`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = train_tokenizer(spec.vocab, out_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg = Qwen2Config(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_positions,
        tie_word_embeddings=spec.tie_embeddings, rope_theta=1000000.0, rms_norm_eps=1e-6,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], use_cache=True,
    )
    cfg.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(spec.seed)
    # Big shapes initialise much faster on a GPU; the seed makes them deterministic per device.
    device = "cuda" if spec.hidden >= 1024 and torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(out_dir)
    save_generation_config(out_dir, tok)
    del model
