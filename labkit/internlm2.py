"""Models built like the course model, InternLM2.5: `generated:tiny-internlm2`, and the writer that
other builders (trained models) use to put an InternLM2-format model into a folder.

What makes a folder "InternLM2-shaped", as the real internlm2_5-1_8b-chat is:
- config.json: `InternLM2ForCausalLM`, model_type `internlm2`, and `auto_map` pointing at
  configuration_internlm2.py / modeling_internlm2.py that labkit writes into the folder (labkit's own
  small implementation), so every transformers loader needs `trust_remote_code=True`;
- weights under InternLM2's names, attention packed into one `wqkv` per layer: for each KV group, the
  group's query heads, then its key head, then its value head (what lmdeploy's loaders split);
- the chat template internlm2_5-1_8b-chat ships (<|im_start|>role ... <|im_end|>), extended with
  InternLM2's tool format: tools in `<|im_start|>system name=<|plugin|>`, calls as
  `<|action_start|><|plugin|>{"name": ..., "parameters": ...}<|action_end|>`, results in
  `<|im_start|>environment name=<|plugin|>` (read back by `--tool-call-parser internlm`).

    spec = InternLM2Spec(hidden=256, intermediate=768, layers=2, heads=4, kv_heads=2, vocab=4096)
    tok = write_model_files(folder, spec)                # config + code + tokenizer + generation config
    write_weights(folder, spec, random_state_dict(spec))  # or a trained model's state dict
    check_folder(folder)                                  # what lmdeploy's InternLM2 loaders expect

A trained model: pass its `tokenizers.Tokenizer` to write_model_files (InternLM2's special tokens are added,
the vocabulary padded to spec.vocab), train the modeling code's InternLM2ForCausalLM (or a Llama-layout model
and pack its q/k/v with pack_wqkv), write its state dict, and register the builder with
`labkit.generate.register(name, version, build, about)`, build returning {"random_weights": False} so lab 02
lets the model call tools by itself (labkit.tools.forced_for reads that marker).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from labkit import config

ARCH = "InternLM2ForCausalLM"
CODE_FILES = ("configuration_internlm2.py", "modeling_internlm2.py")
AUTO_MAP = {"AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}
# InternLM2's special tokens (its tokenizer has them at 0-2 and at the end of the vocabulary).
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>",
                  "<|im_end|>", "<|im_start|>"]
HEAD_DIMS = (64, 128)  # what TurboMind's attention kernels take

# The chat template of internlm2_5-1_8b-chat's tokenizer_config.json, exactly: plain messages render alike.
SHIPPED_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# The same, plus InternLM2's documented tool format (lmdeploy 0.18 renders every model through its
# tokenizer's template, so the tools must be in it for the api_server's function calling to work).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set nl = '\n' %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system' + nl + messages[0]['content'] + '<|im_end|>' + nl }}{% endif %}"
    "{% if tools %}{{ '<|im_start|>system name=<|plugin|>' + nl + '[' }}"
    "{% for tool in tools %}{% if not loop.first %}{{ ', ' }}{% endif %}"
    "{{ (tool['function'] if tool.get('function') else tool) | tojson }}{% endfor %}"
    "{{ ']<|im_end|>' + nl }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and loop.first %}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>environment name=<|plugin|>' + nl + message['content'] + '<|im_end|>' + nl }}"
    "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{ '<|im_start|>assistant' + nl + (message['content'] or '') }}"
    "{% for tc in message['tool_calls'] %}{% set f = tc['function'] if tc.get('function') else tc %}"
    "{{ '<|action_start|><|plugin|>' + nl + '{\"name\": \"' + f['name'] + '\", \"parameters\": ' }}"
    "{{ f['arguments'] if f['arguments'] is string else (f['arguments'] | tojson) }}{{ '}<|action_end|>' }}"
    "{% endfor %}{{ '<|im_end|>' + nl }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + nl }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>' + nl }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant' + nl }}{% endif %}"
)


class InternLM2FormatError(ValueError):
    """A spec or state dict that is not a valid InternLM2 model; the message says what is wrong."""


@dataclass(frozen=True)
class InternLM2Spec:
    """The shape of an InternLM2-architecture model."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int = 8192
    rope_theta: float = 1000000.0
    tie_embeddings: bool = False
    seed: int = 0
    about: str = ""

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden // self.heads

    def check(self) -> "InternLM2Spec":
        """The spec itself, or an InternLM2FormatError if TurboMind or InternLM2's layout cannot take it."""
        if self.hidden % self.heads or self.head_dim not in HEAD_DIMS:
            raise InternLM2FormatError(f"hidden {self.hidden} / heads {self.heads} must give a head size of "
                                       f"{' or '.join(map(str, HEAD_DIMS))} (TurboMind's kernels)")
        if self.hidden % 128:
            raise InternLM2FormatError(f"hidden {self.hidden} must be a multiple of 128 (TurboMind)")
        if self.heads % self.kv_heads:
            raise InternLM2FormatError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")
        if self.vocab < len(SPECIAL_TOKENS) + 256:
            raise InternLM2FormatError(f"vocab {self.vocab} is too small for the bytes and InternLM2's special tokens")
        return self


SPECS = {
    "tiny-internlm2": InternLM2Spec(
        hidden=256, intermediate=768, layers=2, heads=4, kv_heads=2, vocab=4096,
        about="InternLM2.5's structure (auto_map remote code, packed wqkv, InternLM2 chat and tool format), "
              "2 layers: the course model's path in tests"),
}
FORMAT_VERSION = 1


def expected_shapes(spec: InternLM2Spec) -> dict[str, tuple[int, ...]]:
    """Every weight an InternLM2 checkpoint of this shape holds, with its shape (lmdeploy's loaders' names)."""
    h, d = spec.hidden, spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.tok_embeddings.weight": (spec.vocab, h), "model.norm.weight": (h,)}
    if not spec.tie_embeddings:
        shapes["output.weight"] = (spec.vocab, h)
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "attention.wqkv.weight": ((spec.heads + 2 * spec.kv_heads) * d, h),
            p + "attention.wo.weight": (h, spec.heads * d),
            p + "feed_forward.w1.weight": (spec.intermediate, h),
            p + "feed_forward.w3.weight": (spec.intermediate, h),
            p + "feed_forward.w2.weight": (h, spec.intermediate),
            p + "attention_norm.weight": (h,), p + "ffn_norm.weight": (h,)})
    return shapes


def pack_wqkv(q, k, v, heads: int, kv_heads: int):
    """InternLM2's packed wqkv from separate q/k/v projection weights ([out, in] each, Llama layout)."""
    import torch

    d = q.shape[0] // heads
    groups = heads // kv_heads
    q = q.reshape(kv_heads, groups, d, -1)
    k, v = k.reshape(kv_heads, 1, d, -1), v.reshape(kv_heads, 1, d, -1)
    return torch.cat([q, k, v], dim=1).reshape((heads + 2 * kv_heads) * d, -1)


def unpack_wqkv(wqkv, heads: int, kv_heads: int):
    """(q, k, v) projection weights from InternLM2's packed wqkv (the inverse of pack_wqkv)."""
    groups = heads // kv_heads
    d = wqkv.shape[0] // (heads + 2 * kv_heads)
    t = wqkv.reshape(kv_heads, groups + 2, d, -1)
    return (t[:, :groups].reshape(heads * d, -1), t[:, groups].reshape(kv_heads * d, -1),
            t[:, groups + 1].reshape(kv_heads * d, -1))


def model_classes():
    """(InternLM2Config, InternLM2ForCausalLM) from labkit's own code, the code written into the folders (to
    build or train a model in-process: `InternLM2ForCausalLM(InternLM2Config(**json.load(config.json)))`)."""
    from labkit.data import configuration_internlm2, modeling_internlm2

    return configuration_internlm2.InternLM2Config, modeling_internlm2.InternLM2ForCausalLM


def write_code(out_dir: Path) -> None:
    """Copy labkit's configuration_internlm2.py and modeling_internlm2.py into the model folder."""
    for name in CODE_FILES:
        shutil.copyfile(config.data_file(name), Path(out_dir) / name)


def write_config(out_dir: Path, spec: InternLM2Spec, bos_id: int, eos_id: int, pad_id: int) -> dict:
    """Write config.json as InternLM2.5 ships it (auto_map to the folder's own code) and return it."""
    spec.check()
    cfg = {"architectures": [ARCH], "auto_map": AUTO_MAP, "model_type": "internlm2",
           "attn_implementation": "eager", "bias": False, "hidden_act": "silu",
           "hidden_size": spec.hidden, "intermediate_size": spec.intermediate, "initializer_range": 0.02,
           "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads,
           "max_position_embeddings": spec.max_positions, "rms_norm_eps": 1e-5, "rope_scaling": None,
           "rope_theta": spec.rope_theta, "tie_word_embeddings": spec.tie_embeddings, "vocab_size": spec.vocab,
           "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "pretraining_tp": 1,
           "torch_dtype": "bfloat16", "use_cache": True}
    (Path(out_dir) / "config.json").write_text(json.dumps(cfg, indent=2))
    return cfg


def write_tokenizer(out_dir: Path, vocab_size: int, tokenizer=None):
    """Write tokenizer files with InternLM2's special tokens and chat template; `tokenizer` (a
    `tokenizers.Tokenizer`, e.g. a trained one) or else a byte-level BPE trained on labkit's corpus.
    Returns the transformers tokenizer; its vocabulary is padded to exactly `vocab_size`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if tokenizer is None:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 8192), special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        text = config.data_file("corpus.txt").read_text(encoding="utf-8").split("\n\n")
        tokenizer.train_from_iterator(text, trainer)
    else:
        tokenizer.add_special_tokens(SPECIAL_TOKENS)
    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    nxt = tokenizer.get_vocab_size()
    if nxt > vocab_size:
        raise InternLM2FormatError(f"the tokenizer has {nxt} tokens, more than the model's vocab {vocab_size}")
    while nxt < vocab_size:  # reserved entries, so the vocabulary matches the embedding rows
        vocab[f"<|reserved_{nxt}|>"] = nxt
        nxt += 1
    tokenizer = Tokenizer.from_str(json.dumps(data))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", model_max_length=32768,
                                   additional_special_tokens=SPECIAL_TOKENS[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(chat_template=CHAT_TEMPLATE, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False)
    cfg_path.write_text(json.dumps(cfg, indent=1, ensure_ascii=False))
    return fast


def write_model_files(out_dir: Path, spec: InternLM2Spec, tokenizer=None):
    """Everything but the weights: tokenizer, config.json (auto_map), the remote code, generation_config.json.
    Returns the transformers tokenizer."""
    from transformers import GenerationConfig

    spec.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(out_dir, spec.vocab, tokenizer)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<|im_end|>")}
    write_config(out_dir, spec, bos_id=ids["<s>"], eos_id=ids["</s>"], pad_id=ids["</s>"])
    write_code(out_dir)
    # As internlm2_5-1_8b-chat: stop at </s> or <|im_end|>.
    GenerationConfig(bos_token_id=ids["<s>"], eos_token_id=[ids["</s>"], ids["<|im_end|>"]], pad_token_id=ids["</s>"],
                     do_sample=True, temperature=0.8, top_p=0.8).save_pretrained(out_dir)
    return tok


def random_state_dict(spec: InternLM2Spec) -> dict:
    """Seeded random weights (std 0.02, norms 1) for every tensor of `expected_shapes(spec)`."""
    import torch

    gen = torch.Generator().manual_seed(spec.seed)
    out = {}
    for name, shape in expected_shapes(spec).items():
        out[name] = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
    return out


def check_state_dict(spec: InternLM2Spec, state_dict: dict) -> None:
    """InternLM2FormatError unless `state_dict` has exactly the names and shapes of `expected_shapes(spec)`."""
    check_shapes(spec, {k: tuple(v.shape) for k, v in state_dict.items()})


def check_shapes(spec: InternLM2Spec, shapes: dict[str, tuple[int, ...]]) -> None:
    """InternLM2FormatError unless `shapes` (name -> shape) are exactly those of `expected_shapes(spec)`."""
    want = expected_shapes(spec)
    missing = sorted(set(want) - set(shapes))
    extra = sorted(set(shapes) - set(want))
    wrong = [f"{k} {tuple(shapes[k])} (want {want[k]})" for k in want if k in shapes and tuple(shapes[k]) != want[k]]
    if missing or extra or wrong:
        raise InternLM2FormatError(
            "not an InternLM2 state dict for this spec: " + "; ".join(
                p for p in (f"missing {', '.join(missing[:4])}" if missing else "",
                            f"unexpected {', '.join(extra[:4])}" if extra else "",
                            f"wrong shape {', '.join(wrong[:4])}" if wrong else "") if p)
            + " (InternLM2 packs q, k, v into attention.wqkv: labkit.internlm2.pack_wqkv)")


def write_weights(out_dir: Path, spec: InternLM2Spec, state_dict: dict) -> Path:
    """Check `state_dict` against the spec and save it as bf16 model.safetensors in `out_dir`."""
    import torch
    from safetensors.torch import save_file

    check_state_dict(spec, state_dict)
    path = Path(out_dir) / "model.safetensors"
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in state_dict.items()}, str(path),
              metadata={"format": "pt"})
    return path


def spec_of(model_dir: str | Path) -> InternLM2Spec:
    """The InternLM2Spec that a folder's config.json describes."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return InternLM2Spec(hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
                         layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
                         kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                         vocab=cfg["vocab_size"], max_positions=cfg.get("max_position_embeddings", 8192),
                         rope_theta=cfg.get("rope_theta", 10000.0),
                         tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def check_folder(model_dir: str | Path) -> Path:
    """The folder itself if it is InternLM2-shaped as the course model is (architecture, auto_map to code in
    the folder, InternLM2 weight names and shapes); else an InternLM2FormatError saying what is wrong."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("architectures") != [ARCH] or cfg.get("model_type") != "internlm2":
        raise InternLM2FormatError(f"{model_dir.name}: architectures {cfg.get('architectures')} / model_type "
                                   f"{cfg.get('model_type')!r}, not [{ARCH!r}] / 'internlm2'")
    auto_map = cfg.get("auto_map") or {}
    for key in ("AutoConfig", "AutoModelForCausalLM"):
        if key not in auto_map:
            raise InternLM2FormatError(f"{model_dir.name}: config.json has no auto_map[{key!r}]: transformers "
                                       f"cannot load an internlm2 model without it (rewrite it with write_config)")
        module = auto_map[key].split(".")[0]
        if not (model_dir / f"{module}.py").is_file():
            raise InternLM2FormatError(f"{model_dir.name}: auto_map[{key!r}] names {module}.py, which is not in the "
                                       f"folder (write_code puts it there)")
    shapes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    check_shapes(spec_of(model_dir).check(), shapes)
    return model_dir


def build(name: str, out_dir: Path) -> dict:
    """Write generated model `name` (random weights) into `out_dir`; the marker's extra fields."""
    spec = SPECS[name].check()
    write_model_files(out_dir, spec)
    write_weights(out_dir, spec, random_state_dict(spec))
    return {"architecture": ARCH, "random_weights": True, "spec": spec.__dict__}


def _register() -> None:
    from labkit import generate

    for name in SPECS:
        generate.register(name, FORMAT_VERSION, lambda out_dir, _n=name: build(_n, out_dir), about=SPECS[name].about)


_register()
