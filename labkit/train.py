"""Small chat models trained here, on CPU, from the text `labkit.corpus` generates (`labkit models train`).

A recipe (shape, corpus size, seed, steps) fully determines a model. The conversations are rendered with
the model's own chat template exactly as lmdeploy's api_server renders a request (lmdeploy's request
normalisation and tool dump, then the tokenizer's apply_chat_template), so what the model learned is what
it sees when served. The tokenizer is a byte-level BPE trained on that text, digits split one per token.

labkit ships the trained weights (labkit/data/trained/NAME, a few MB, with `labkit-trained.json` holding
the recipe and its hash); `recipe_hash(RECIPES[name])` says whether they are still what the recipe makes.

    labkit models train tiny-chat            # about 10-20 minutes on 2 CPU cores
    resolve("trained:tiny-chat")             # the shipped folder (labs on CPU, tests, the GPU suite)
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from labkit import config

META = "labkit-trained.json"
FORMAT_VERSION = 2  # bump when the files of a trained model change


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a trained model."""

    arch: str = "qwen2"            # chat format: ChatML, Qwen2.5 tool calls (--tool-call-parser qwen)
    hidden: int = 128              # multiples of 128: AWQ groups of 128
    intermediate: int = 384
    layers: int = 3
    heads: int = 2                 # head_dim 64 (TurboMind and the PyTorch engine both run it)
    kv_heads: int = 2
    vocab: int = 1024
    conversations: int = 12000
    seed: int = 0
    steps: int = 1800
    batch: int = 16
    lr: float = 3e-3
    warmup: int = 60
    more_steps: int = 0            # then a warm restart: this many more steps (fresh optimizer, new order)
    about: str = ""


RECIPES: dict[str, Recipe] = {
    "tiny-internlm2-chat": Recipe(arch="internlm2", about="InternLM2.5's structure (remote code, packed wqkv) "
                                  "and tool format (--tool-call-parser internlm), 3 layers, 0.90M parameters, "
                                  "trained like tiny-chat"),
    "tiny-chat": Recipe(more_steps=500, about="Qwen2 shape, 3 layers, 0.77M parameters, trained here on generated chat, "
                              "stories, sums and add/mul tool use; says it is not InternLM2.5"),
}
HELDOUT_SEED = 10_001  # held-out text: other numbers, other stories (labkit.quant's perplexity)


from labkit.errors import InputError  # noqa: E402


class TrainError(InputError):
    """A trained model that cannot be made or used; the message says what to do."""


ARCHS = ("qwen2", "internlm2")


def chat_format(arch: str) -> tuple[str, list[str], str, str | None]:
    """(chat template, special tokens, end token, bos token) of an architecture's chat format."""
    if arch == "qwen2":
        from labkit.generate import CHAT_TEMPLATE, SPECIAL_TOKENS

        return CHAT_TEMPLATE, SPECIAL_TOKENS, "<|im_end|>", None
    if arch == "internlm2":
        from labkit import internlm2

        return internlm2.CHAT_TEMPLATE, internlm2.SPECIAL_TOKENS, "<|im_end|>", "<s>"
    raise TrainError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")


def arch_of(model_dir: str | Path) -> str:
    """The chat format a trained model's folder was made with (its labkit-trained.json)."""
    return json.loads((Path(model_dir) / META).read_text())["recipe"]["arch"]


@functools.lru_cache(maxsize=8)
def recipe_hash(recipe: Recipe) -> str:
    """A short hash of the recipe (less its description), the corpus version, the chat template and the training text."""
    from labkit import corpus

    what = {k: v for k, v in asdict(recipe).items() if k != "about"}  # the description does not change the weights
    h = hashlib.sha256(json.dumps({"recipe": what, "corpus": corpus.CORPUS_VERSION,
                                   "format": FORMAT_VERSION, "template": chat_format(recipe.arch)[0]},
                                  sort_keys=True).encode())
    for text in render(corpus.conversations(recipe.conversations, recipe.seed), arch=recipe.arch):
        h.update(text.encode())
    return h.hexdigest()[:16]


def is_trained(model_dir: str | Path) -> bool:
    """True for a model folder that labkit trained (it holds labkit-trained.json)."""
    return (Path(model_dir) / META).is_file()


def calibration_text(arch: str = "qwen2", conversations: int = 600) -> Path:
    """Conversations of the training generator (seed 1: neither the training set nor the held-out text),
    rendered in `arch`'s chat format, as a text file: AWQ calibration text of the trained models' own kind."""
    from labkit import corpus

    path = config.home() / "heldout" / f"calib-{arch}-c{corpus.CORPUS_VERSION}-n{conversations}.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(render(corpus.conversations(conversations, seed=1), arch=arch)), encoding="utf-8")
        tmp.replace(path)
    return path


def shipped_dir(name: str) -> Path:
    """Where labkit keeps the committed weights of trained model `name`."""
    return config.data_file("trained") / name


# ----------------------------------------------------------------------------- rendering

@functools.lru_cache(maxsize=4)
def _template_tokenizer(arch: str):
    """A bytes-only tokenizer carrying the chat template: renders text before the real tokenizer exists."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    template, special, end, bos = chat_format(arch)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(special)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=end, bos_token=bos)
    fast.chat_template = template
    return fast


def render(convs: list[tuple[str, list[dict]]], tokenizer=None, arch: str = "qwen2") -> list[str]:
    """Each conversation as the text the model reads (tool conversations with the course's tools offered)."""
    from labkit.tools import TOOLS, server_view

    tok = tokenizer or _template_tokenizer(arch)
    out = []
    for kind, msgs in convs:
        msgs, tools = server_view(msgs, TOOLS if kind == "tools" else None)
        out.append(tok.apply_chat_template(msgs, tools=tools, tokenize=False))
    return out


# ----------------------------------------------------------------------------- tokenizer and model

def train_tokenizer(texts: list[str], vocab: int, out_dir: Path, recipe: "Recipe | None" = None):
    """Byte-level BPE on the rendered text (digits one per token), exactly `vocab` entries, chat template set.
    For InternLM2 the model's other files (config.json, remote code) are written too (labkit.internlm2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from labkit.generate import save_chatml_tokenizer

    from tokenizers import Regex
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    # Qwen2's own pre-tokenizer (transformers rebuilds it for every qwen2 folder, whatever tokenizer.json says):
    # words, single digits (sums and tool arguments are copied digit by digit), runs of newlines.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    arch = recipe.arch if recipe else "qwen2"
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=chat_format(arch)[1], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok = _newlines_alone(tok)
    if arch == "internlm2":
        from labkit import internlm2

        return internlm2.write_model_files(out_dir, _spec(recipe), tokenizer=tok)
    data = json.loads(tok.to_str())
    nxt = len(data["model"]["vocab"]) + len([t for t in data["added_tokens"] if t["content"] not in
                                             data["model"]["vocab"]])
    while nxt < vocab:  # pad with reserved entries so the vocabulary matches the embedding rows
        data["model"]["vocab"][f"<|reserved_{nxt}|>"] = nxt
        nxt += 1
    tok = Tokenizer.from_str(json.dumps(data))
    if tok.get_vocab_size() != vocab:
        raise TrainError(f"tokenizer has {tok.get_vocab_size()} entries, not {vocab}: raise the recipe's vocab")
    return save_chatml_tokenizer(tok, out_dir)


def _newlines_alone(tok):
    """The tokenizer without merges that contain a newline, so a newline is always its own token. A reply
    starts right after the template's "assistant\n", and a tool call's reply starts "\n<tool_call>": a merged
    "\n\n" in training would never follow the prompt's lone "\n" when the model is served."""
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    merges = data["model"]["merges"]
    as_pair = (lambda m: m) if merges and isinstance(merges[0], list) else (lambda m: m.split(" ", 1))
    data["model"]["merges"] = [m for m in merges if not any("Ċ" in part for part in as_pair(m))]
    return Tokenizer.from_str(json.dumps(data))


def _spec(recipe: Recipe):
    from labkit.internlm2 import InternLM2Spec

    return InternLM2Spec(hidden=recipe.hidden, intermediate=recipe.intermediate, layers=recipe.layers,
                         heads=recipe.heads, kv_heads=recipe.kv_heads, vocab=recipe.vocab, max_positions=4096,
                         rope_theta=10000.0, seed=recipe.seed).check()


def _model(recipe: Recipe, tok, folder: Path):
    if recipe.arch == "internlm2":
        from labkit.internlm2 import model_classes

        config_cls, model_cls = model_classes()
        return model_cls(config_cls(**json.loads((folder / "config.json").read_text())))
    from transformers import Qwen2Config, Qwen2ForCausalLM

    end, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    cfg = Qwen2Config(vocab_size=recipe.vocab, hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
                      num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                      num_key_value_heads=recipe.kv_heads, max_position_embeddings=4096,
                      tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
                      bos_token_id=end, eos_token_id=im_end, pad_token_id=end, use_cache=True)
    cfg.architectures = ["Qwen2ForCausalLM"]
    return Qwen2ForCausalLM(cfg)


def _batches(ids: list[list[int]], batch: int, pad: int, rng):
    """Batches in a seeded random order, each from one of two length buckets (tool transcripts, the rest)
    with the kinds mixed inside, padded to their longest."""
    import torch

    cut = sorted(len(x) for x in ids)[len(ids) // 2]
    buckets = [[i for i in range(len(ids)) if len(ids[i]) > cut], [i for i in range(len(ids)) if len(ids[i]) <= cut]]
    while True:
        groups = []
        for bucket in buckets:
            rng.shuffle(bucket)
            groups += [bucket[i:i + batch] for i in range(0, len(bucket) - batch + 1, batch)]
        rng.shuffle(groups)
        for g in groups:
            n = max(len(ids[i]) for i in g)
            x = torch.full((len(g), n), pad, dtype=torch.long)
            mask = torch.zeros((len(g), n), dtype=torch.long)
            for row, i in enumerate(g):
                x[row, :len(ids[i])] = torch.tensor(ids[i])
                mask[row, :len(ids[i])] = 1
            yield x, mask


def _run(model, ids: list[list[int]], steps: int, recipe: Recipe, pad: int, seed: int, start: float,
         quiet: bool, label: str) -> list[float]:
    """`steps` AdamW steps (warm-up, cosine decay) over seeded batches of `ids`; the losses."""
    import random

    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    losses = []
    batches = _batches(ids, recipe.batch, pad, random.Random(seed))
    model.train()
    for step in range(steps):
        x, mask = next(batches)
        labels = x.masked_fill(mask == 0, -100)
        loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(round(loss.item(), 4))
        if not quiet and (step % 50 == 0 or step == steps - 1):
            print(f"{label} step {step:>5}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f} s",
                  flush=True)
    return losses


def train(name: str, out_dir: Path | None = None, recipe: Recipe | None = None, quiet: bool = False,
          phase1: Path | None = None) -> Path:
    """Train model `name` (or `recipe`) on CPU and write it to `out_dir` (default: under LABKIT_HOME).
    `phase1`: a folder this recipe's first phase already wrote (its bf16 weights), to run only the restart."""
    import torch

    from labkit import corpus
    from labkit.generate import save_generation_config

    if recipe is None:
        if name not in RECIPES:
            raise TrainError(f"no recipe called {name!r}: choose one of {', '.join(RECIPES)}")
        recipe = RECIPES[name]
    digest = recipe_hash(recipe)
    out_dir = Path(out_dir) if out_dir else config.home() / "trained" / f"{name}-{digest}"
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(int(os.environ.get("LABKIT_TRAIN_THREADS", "1")))  # 1: fastest on a shared CPU
    texts = render(corpus.conversations(recipe.conversations, recipe.seed), arch=recipe.arch)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        tok = train_tokenizer(texts, recipe.vocab, tmp, recipe)
        model = _model(recipe, tok, tmp)
        model.config.save_pretrained(tmp)
        # Train on the tokenizer exactly as transformers and lmdeploy will load it from the folder.
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tmp), trust_remote_code=recipe.arch == "internlm2")
        ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
        pad = tok.pad_token_id
        if phase1 is None:
            losses = _run(model, ids, recipe.steps, recipe, pad, recipe.seed, start, quiet, "phase 1")
        else:  # the first phase's weights as it saved them
            from safetensors.torch import load_file

            missing, unexpected = model.load_state_dict(load_file(str(Path(phase1) / "model.safetensors")),
                                                        strict=False)
            if unexpected or set(missing) - {"lm_head.weight"}:  # tied to the embeddings, not stored
                raise TrainError(f"{phase1} is not this recipe's first phase: {(unexpected + missing)[:3]}")
            losses = json.loads((Path(phase1) / META).read_text()).get("losses_phase1", [])
        if recipe.more_steps:  # (tool transcripts alone here made it forget how to chat)
            model = model.to(torch.bfloat16).float()  # phase 2 starts from the weights as phase 1 saves them
            losses += _run(model, ids, recipe.more_steps, recipe, pad, recipe.seed + 1, start, quiet, "phase 2")
        model = model.to(torch.bfloat16).eval()
        if recipe.arch == "internlm2":
            from labkit.internlm2 import write_weights

            write_weights(tmp, _spec(recipe), model.state_dict())
        else:
            model.config.dtype = "bfloat16"
            model.save_pretrained(tmp)
            save_generation_config(tmp, tok)
        meta = {"name": name, "recipe": asdict(recipe), "recipe_hash": digest, "corpus_version": corpus.CORPUS_VERSION,
                "parameters": sum(p.numel() for p in model.parameters()), "seconds": round(time.perf_counter() - start),
                "loss_first": losses[0] if losses else None,
                "loss_last_50": round(sum(losses[-50:]) / len(losses[-50:]), 4) if losses else None,
                "torch": torch.__version__}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        print(f"trained {name} ({meta['parameters']:,} parameters) in {meta['seconds']} s -> {out_dir}")
    return out_dir


def smoke_recipe(recipe: Recipe, steps: int = 3, conversations: int = 60) -> Recipe:
    """The same recipe cut to a few steps on a few conversations (the quick re-train test)."""
    return replace(recipe, steps=steps, conversations=conversations, warmup=1, vocab=512)


def ensure(name: str) -> Path:
    """The folder of trained model `name`: the shipped one if its recipe hash is current, else a local one."""
    if name not in RECIPES:
        from labkit.models import ModelNotFoundError

        raise ModelNotFoundError(f"no trained model called {name!r}; choose one of "
                                 f"{', '.join('trained:' + n for n in RECIPES)}")
    digest = recipe_hash(RECIPES[name])
    for folder in (shipped_dir(name), config.home() / "trained" / f"{name}-{digest}"):
        meta = folder / META
        if meta.is_file() and json.loads(meta.read_text()).get("recipe_hash") == digest:
            return folder
    from labkit.models import ModelNotFoundError

    raise ModelNotFoundError(f"the shipped weights of trained:{name} do not match its recipe (hash {digest}): "
                             f"run `labkit models train {name}` (10-20 minutes on CPU)")
