"""generated:tiny-internlm2, the model built like the course model (InternLM2.5): it loads only through
remote code, lmdeploy's own detection, chat template, tool parser and weight splitters take it for
InternLM2, and the transformers baseline generates with it. Broken copies fail the same checks."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from helpers import one_line

NAME = "generated:tiny-internlm2"


@pytest.fixture(scope="module")
def tlm_dir():
    """The generated tiny-internlm2 folder (built once under LABKIT_HOME)."""
    from labkit.models import resolve

    return resolve(NAME)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"))
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


def test_structure_is_the_course_models(tlm_dir):
    from labkit import generate, internlm2

    cfg = json.loads((tlm_dir / "config.json").read_text())
    assert cfg["architectures"] == ["InternLM2ForCausalLM"] and cfg["model_type"] == "internlm2"
    assert cfg["auto_map"]["AutoConfig"] == "configuration_internlm2.InternLM2Config"
    assert cfg["hidden_size"] % 128 == 0 and cfg["hidden_size"] // cfg["num_attention_heads"] in (64, 128)
    assert internlm2.check_folder(tlm_dir) == tlm_dir
    assert generate.info(tlm_dir)["architecture"] == "InternLM2ForCausalLM" and generate.random_weights(tlm_dir)
    vocab = json.loads((tlm_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(cfg["vocab_size"]))  # every embedding row has one token


def test_loads_only_with_remote_code(tlm_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoConfig.from_pretrained(tlm_dir, trust_remote_code=False)
    cfg = AutoConfig.from_pretrained(tlm_dir, trust_remote_code=True)
    assert type(cfg).__name__ == "InternLM2Config" and type(cfg).__module__.startswith("transformers_modules.")
    model = AutoModelForCausalLM.from_pretrained(tlm_dir, trust_remote_code=True)
    assert type(model).__name__ == "InternLM2ForCausalLM"
    assert model.model.layers[0].attention.wqkv.weight.shape == (512, 256)  # (4 + 2*2) heads of 64


def test_without_auto_map_it_does_not_load(tlm_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from labkit import internlm2

    broken = _copy(tlm_dir, tmp_path / "no-auto-map")
    _edit_config(broken, auto_map=None)
    with pytest.raises(internlm2.InternLM2FormatError) as err:
        internlm2.check_folder(broken)
    assert "auto_map" in one_line(err)
    with pytest.raises((ValueError, KeyError)):
        AutoModelForCausalLM.from_pretrained(broken, trust_remote_code=True)
    no_code = _copy(tlm_dir, tmp_path / "no-code")
    (no_code / "modeling_internlm2.py").unlink()
    with pytest.raises(internlm2.InternLM2FormatError) as err:
        internlm2.check_folder(no_code)
    assert "names modeling_internlm2.py, which is not in the folder" in one_line(err)
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(no_code, trust_remote_code=True)


def test_lmdeploy_recognises_internlm2(tlm_dir):
    from lmdeploy.archs import get_model_arch
    from lmdeploy.pytorch.models.module_map import MODULE_MAP
    from lmdeploy.turbomind.supported_models import SUPPORTED_ARCHS, is_supported

    arch, cfg = get_model_arch(str(tlm_dir), trust_remote_code=True)
    assert arch == "InternLM2ForCausalLM" and type(cfg).__name__ == "InternLM2Config"
    assert MODULE_MAP[arch].endswith("pytorch.models.internlm2.InternLM2ForCausalLM")
    assert SUPPORTED_ARCHS[arch] == "internlm2" and is_supported(str(tlm_dir), trust_remote_code=True)


def test_chat_template_is_internlm2s(tlm_dir):
    from jinja2 import Template
    from lmdeploy.model import get_chat_template

    from labkit import internlm2, tools

    tmpl = get_chat_template(str(tlm_dir), trust_remote_code=True)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}]
    prompt = tmpl.messages2prompt(msgs)
    shipped = Template(internlm2.SHIPPED_CHAT_TEMPLATE).render(messages=msgs, bos_token="<s>",
                                                              add_generation_prompt=True)
    assert prompt == shipped  # plain chats render exactly as internlm2_5-1_8b-chat's own template
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    with_tools = tmpl.messages2prompt([
        {"role": "user", "content": "Compute (3+5)*2"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 5}'}}]},
        {"role": "tool", "tool_call_id": "1", "content": "8"}], tools=tools.TOOLS)
    assert "<|im_start|>system name=<|plugin|>\n[" in with_tools and '"name": "mul"' in with_tools
    assert '<|action_start|><|plugin|>\n{"name": "add", "parameters": {"a": 3, "b": 5}}<|action_end|>' in with_tools
    assert "<|im_start|>environment name=<|plugin|>\n8<|im_end|>" in with_tools
    # What the model would write back is what lmdeploy's internlm parser reads.
    reply = '<|action_start|><|plugin|>\n{"name": "mul", "parameters": {"a": 8, "b": 2}}<|action_end|>'
    assert tools.parse_reply(reply, "internlm")["tool_calls"] == [{"name": "mul", "arguments": '{"a": 8, "b": 2}'}]
    assert tools.parse_reply(reply, "qwen")["tool_calls"] == []  # the wrong parser reads no call


def _tm_split_qkv_gqa():
    """TurboMind's own `_split_qkv_gqa` (lmdeploy/turbomind/models/internlm2.py), without the decorator that
    needs the CUDA build: its source, compiled here."""
    import lmdeploy

    src = (Path(lmdeploy.__file__).parent / "turbomind" / "models" / "internlm2.py").read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "_split_qkv_gqa")
    fn.decorator_list = []
    scope: dict = {}
    exec(compile(ast.Module([fn], type_ignores=[]), "turbomind/models/internlm2.py", "exec"), scope)
    return scope["_split_qkv_gqa"]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}


def _llama_logits(cfg: dict, weights: dict, split, ids):
    """Logits of transformers' own Llama with InternLM2's weights, split into q/k/v by `split`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope_theta"], tie_word_embeddings=False, attention_bias=False)).eval()
    state = {"model.embed_tokens.weight": weights["model.tok_embeddings.weight"],
             "model.norm.weight": weights["model.norm.weight"], "lm_head.weight": weights["output.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p, lp = f"model.layers.{i}.", f"model.layers.{i}."
        q, k, v = split(weights[p + "attention.wqkv.weight"])
        state.update({lp + "self_attn.q_proj.weight": q, lp + "self_attn.k_proj.weight": k,
                      lp + "self_attn.v_proj.weight": v, lp + "self_attn.o_proj.weight": weights[p + "attention.wo.weight"],
                      lp + "mlp.gate_proj.weight": weights[p + "feed_forward.w1.weight"],
                      lp + "mlp.up_proj.weight": weights[p + "feed_forward.w3.weight"],
                      lp + "mlp.down_proj.weight": weights[p + "feed_forward.w2.weight"],
                      lp + "input_layernorm.weight": weights[p + "attention_norm.weight"],
                      lp + "post_attention_layernorm.weight": weights[p + "ffn_norm.weight"]})
    llama.load_state_dict(state, strict=False)
    with torch.no_grad():
        return llama(ids).logits


def _splitters(cfg: dict):
    """lmdeploy's two wqkv splitters for this shape: the PyTorch engine's ('hgd' layout) and TurboMind's."""
    import torch
    from lmdeploy.pytorch.nn.linear import build_qkv_proj

    heads, kv, h = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    proj = build_qkv_proj(h, num_q_heads=heads, num_kv_heads=kv, head_size=h // heads, bias=False,
                          dtype=torch.float32, device="cpu")
    tm = _tm_split_qkv_gqa()
    # TurboMind splits along the last (output) dim of [in, out] tensors; q comes back as [in, heads, head_dim].
    return {"pytorch": lambda w: proj.weight_spliter(w, layout="hgd"),
            "turbomind": lambda w: tuple(t.reshape(t.shape[0], -1).T
                                         for t in tm(w.T, head_dim=h // heads, q_heads=heads, kv_heads=kv))}


def test_lmdeploy_splits_wqkv_into_the_same_model(tlm_dir):
    """Both engines' wqkv splitters, fed our weights, give a Llama that computes what our modeling code does."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = json.loads((tlm_dir / "config.json").read_text())
    ours = AutoModelForCausalLM.from_pretrained(tlm_dir, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(20, cfg["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(ids).logits
    weights = _weights(tlm_dir)
    for engine, split in _splitters(cfg).items():
        got = _llama_logits(cfg, weights, split, ids)
        assert torch.allclose(got, want, atol=1e-4), f"{engine}: max diff {(got - want).abs().max():.3g}"
    # A checkpoint packed the Llama way ([all q; all k; all v]) reads as a different model: the check can fail.
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    from labkit.internlm2 import unpack_wqkv

    flat = {k: (torch.cat(unpack_wqkv(v, heads, kv)) if k.endswith("wqkv.weight") else v) for k, v in weights.items()}
    got = _llama_logits(cfg, flat, _splitters(cfg)["pytorch"], ids)
    assert not torch.allclose(got, want, atol=1e-2)


def test_wrong_wqkv_shape_fails(tlm_dir, tmp_path):
    import torch
    from safetensors.torch import save_file

    from labkit import internlm2

    broken = _copy(tlm_dir, tmp_path / "bad-wqkv")
    weights = _weights(broken)
    weights["model.layers.0.attention.wqkv.weight"] = torch.zeros(3 * 256, 256)  # MHA-sized, but kv_heads is 2
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(broken / "model.safetensors"))
    with pytest.raises(internlm2.InternLM2FormatError) as err:
        internlm2.check_folder(broken)
    assert "model.layers.0.attention.wqkv.weight (768, 256) (want (512, 256))" in one_line(err)
    with pytest.raises(internlm2.InternLM2FormatError, match="missing model.layers.1.attention.wqkv.weight"):
        spec = internlm2.SPECS["tiny-internlm2"]
        internlm2.write_weights(tmp_path, spec, {k: v for k, v in internlm2.random_state_dict(spec).items()
                                                 if "layers.1.attention.wqkv" not in k})


def test_pack_and_unpack_are_inverse():
    import torch

    from labkit.internlm2 import pack_wqkv, unpack_wqkv

    q, k, v = torch.randn(8 * 64, 32), torch.randn(2 * 64, 32), torch.randn(2 * 64, 32)
    packed = pack_wqkv(q, k, v, heads=8, kv_heads=2)
    assert packed.shape == (12 * 64, 32)
    assert all(torch.equal(a, b) for a, b in zip(unpack_wqkv(packed, 8, 2), (q, k, v)))
    assert torch.equal(packed[4 * 64:5 * 64], k[:64])  # group 0: 4 query heads, then its key head


def test_spec_checks_what_turbomind_needs():
    from labkit.internlm2 import InternLM2FormatError, InternLM2Spec

    with pytest.raises(InternLM2FormatError, match="head size of 64 or 128"):
        InternLM2Spec(hidden=256, intermediate=512, layers=1, heads=8, kv_heads=2, vocab=4096).check()
    with pytest.raises(InternLM2FormatError, match="multiple of kv_heads"):
        InternLM2Spec(hidden=384, intermediate=512, layers=1, heads=6, kv_heads=4, vocab=4096).check()


def test_transformers_baseline_generates(tlm_dir):
    from labkit.baseline import HFEngine

    with HFEngine(NAME, device="cpu", name="tlm-baseline") as hf:
        out = hf.generate("Hello", max_new_tokens=8, temperature=0)
        assert out.generate_token_len == 8 and out.input_token_len > 3 and out.text
        pieces = list(hf.stream("Hello", max_new_tokens=4, temperature=0))
        assert pieces and pieces[-1].generate_token_len == 4


@pytest.mark.gpu
def test_the_engine_reads_wqkv_as_our_modeling_code_does(tlm_dir):
    """The engine the suite runs (TurboMind or the PyTorch engine, LABKIT_BACKEND) computes the logits our
    transformers code computes for the same tokens: both read the packed wqkv alike."""
    import torch
    from lmdeploy import GenerationConfig
    from lmdeploy.tokenizer import Tokenizer
    from transformers import AutoModelForCausalLM

    from labkit.engine import Engine

    text = "The lighthouse keeper found a message in a bottle and read it twice, slowly."
    ids = Tokenizer(str(tlm_dir)).encode(text)  # what the engine gets for this prompt
    ours = AutoModelForCausalLM.from_pretrained(tlm_dir, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ours(torch.tensor([ids])).logits[0].float()
    with Engine(tlm_dir, name="tlm-logits", cache_ratio=0.05) as eng:
        reply = eng.pipe(text, gen_config=GenerationConfig(max_new_tokens=1, output_logits="all"), do_preprocess=False)
        backend = eng.backend
    if reply.logits is None and backend == "pytorch":  # measured on the H200 runner, lmdeploy 0.18.0
        pytest.skip("the PyTorch engine returned no prompt logits for output_logits='all' (reply.logits is None); "
                    "TurboMind's are compared (this test passed there)")
    got = reply.logits.float().cpu()
    n = min(len(got), len(want))
    assert n >= len(ids) - 1, (got.shape, want.shape)
    corr = float(torch.corrcoef(torch.stack([got[:n].flatten(), want[:n].flatten()]))[0, 1])
    assert corr > 0.99, f"{backend}: logits correlate {corr:.3f} with labkit's InternLM2 code"


def _required_format(parser: str, tools_: list[dict]) -> dict:
    """The guided-decoding format lmdeploy's api_server builds for tool_choice="required" with `parser`."""
    from lmdeploy.serve.openai.protocol import ChatCompletionRequest
    from lmdeploy.serve.parsers.response_parser import BaseResponseParser

    cls = type(f"Forced_{parser}", (BaseResponseParser,), {})
    cls.set_parsers(tool_parser_name=parser)
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "?"}], tools=tools_,
                                    tool_choice="required")
    return cls(request).request.response_format


def _grammar_writes(model_dir: Path, response_format: dict, target: str) -> str:
    """How much of `target` lmdeploy's own guided decoding (the PyTorch engine's xgrammar manager, on CPU) lets
    a model write with this folder's tokenizer: at each step, the longest allowed token that stays on target."""
    import torch
    from lmdeploy.pytorch.engine.guided_process import GuidedDecodingManager
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    manager = GuidedDecodingManager(tok, vocab_size=vocab)
    matcher = manager.get_processor(0, 0, response_format)
    mask = manager.allocate_batched_bitmap(1)
    pieces = [tok.decode([i]) for i in range(vocab)]
    ids = torch.arange(vocab)
    written = ""
    while written != target:
        manager.fill_bitmap(matcher, mask, 0)
        allowed = ((mask[0][ids // 32] >> (ids % 32)) & 1).bool()
        fits = [i for i in ids[allowed].tolist() if pieces[i] and target.startswith(written + pieces[i])]
        if not fits:
            return written
        best = max(fits, key=lambda i: len(pieces[i]))
        manager.accept_token(matcher, best)
        written += pieces[best]
    return written


def test_forced_tool_call_can_be_written_in_internlm2s_format(tlm_dir):
    """Lab 02 forces the random model's calls (tool_choice="required"); with the internlm parser, lmdeploy's
    grammar must let this tokenizer write InternLM2's call, and only the wanted one."""
    from labkit import tools

    [first, *_] = tools.forced_rounds([("add", {"a": 3, "b": 5})])
    fmt = _required_format("internlm", first["tools"])
    call = '<|action_start|><|plugin|>{"name": "add", "parameters": {"a": 3, "b": 5}}<|action_end|>'
    assert _grammar_writes(tlm_dir, fmt, call) == call
    assert tools.parse_reply(call, "internlm")["tool_calls"] == [{"name": "add", "arguments": '{"a": 3, "b": 5}'}]
    other = call.replace('"b": 5', '"b": 6')  # the schema admits only b = 5
    assert _grammar_writes(tlm_dir, fmt, other) != other


def test_forced_answer_can_be_written_and_only_that_one(tlm_dir):
    """After the forced calls, lab 02 forces the random model's text answer from what mul returned: lmdeploy's
    grammar must let this tokenizer write "The answer is 16." and nothing else (a lie stays a lie: 18 is refused
    when 16 came back, so the answer check sees what the tools returned)."""
    from labkit import tools

    fmt = tools.forced_answer(16)["response_format"]
    assert _grammar_writes(tlm_dir, fmt, "The answer is 16.") == "The answer is 16."
    assert _grammar_writes(tlm_dir, fmt, "The answer is 18.") != "The answer is 18."
    assert _grammar_writes(tlm_dir, tools.forced_answer(2.5)["response_format"], "The answer is 2.5.") == \
        "The answer is 2.5."


def test_model_classes_build_what_the_folder_holds(tlm_dir):
    """labkit's own classes, in-process (for training): the same parameter names and shapes as the folder."""
    from labkit import internlm2

    config_cls, model_cls = internlm2.model_classes()
    cfg = json.loads((tlm_dir / "config.json").read_text())
    model = model_cls(config_cls(**{k: v for k, v in cfg.items() if k not in ("architectures", "auto_map")}))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    internlm2.check_shapes(internlm2.spec_of(tlm_dir), shapes)


def test_a_trained_tokenizer_gets_internlm2s_special_tokens(tmp_path):
    """The writer's path for trained models: a tokenizer of its own, InternLM2's special tokens added, every id
    used once, the vocabulary padded to the spec's; a tokenizer too big for the spec is refused."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from labkit import internlm2

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Compute (3+5)*2 with the tools add and mul."] * 4, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    spec = internlm2.InternLM2Spec(hidden=128, intermediate=256, layers=1, heads=2, kv_heads=1, vocab=384)
    fast = internlm2.write_model_files(tmp_path, spec, tokenizer=tok)
    internlm2.write_weights(tmp_path, spec, internlm2.random_state_dict(spec))
    assert internlm2.check_folder(tmp_path) == tmp_path and len(fast) == 384
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    ids = list(data["model"]["vocab"].values())
    assert sorted(ids) == list(range(384))  # each id once
    assert all(data["model"]["vocab"][a["content"]] == a["id"] for a in data["added_tokens"])
    text = "<|im_start|>user\nCompute (3+5)*2<|im_end|>"
    enc = fast(text).input_ids
    assert enc[0] == fast.convert_tokens_to_ids("<|im_start|>") and fast.decode(enc) == text
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (fast.convert_tokens_to_ids("<s>"),
                                                          fast.convert_tokens_to_ids("</s>"))
    with pytest.raises(internlm2.InternLM2FormatError, match="more than the model's vocab 270"):
        internlm2.write_tokenizer(tmp_path / "small", 270, tok)


@pytest.mark.gpu
def test_forced_round_trip_reaches_16_over_a_real_server(tlm_dir):
    """Lab 02's round trip for a random model, on the suite's engine with InternLM2's parser: forced add, forced
    mul from add's result, forced answer; check_chain passes. With an add that lies, the lie reaches the answer
    and the answer check fails (the checks can fail)."""
    from labkit import tools
    from labkit.serve import Server

    parser = tools.parser_for(tlm_dir)
    assert parser == "internlm"
    with Server(tlm_dir, name="test-tlm-forced", cache_ratio=0.05, tool_call_parser=parser, show=False) as srv:
        client = srv.client()
        run = tools.run_tool_loop(client, srv.model_name, "Compute (3+5)*2", rounds=tools.forced_chain(3, 5, 2),
                                  tool_choice=None, max_tokens=None, temperature=0.8)
        liar = {**tools.DISPATCH, "add": lambda a, b: a + b + 1}
        lied = tools.run_tool_loop(client, srv.model_name, "Compute (3+5)*2", rounds=tools.forced_chain(3, 5, 2),
                                   tool_choice=None, max_tokens=None, temperature=0.8, dispatch=liar)
    print(srv.backend, run.table().to_string(), "| lied:", lied.answer)
    assert all(ok for _, ok, _ in tools.check_chain(run, 3, 5, 2)), tools.check_chain(run, 3, 5, 2)
    assert run.answer == "The answer is 16."
    lied_checks = tools.check_chain(lied, 3, 5, 2)
    assert lied_checks[1][1] and not lied_checks[2][1] and lied.answer == "The answer is 18.", lied_checks


@pytest.mark.gpu
def test_chat_session_history_is_seen_and_a_dropped_one_too(tlm_dir):
    """eng.chat_turns marks turn 2 "history kept" on the suite's engine (lab 01's check), and the same rule says
    False for turns that ran in separate sessions (a history that was dropped)."""
    import pandas as pd

    from labkit.engine import Engine, history_kept

    first, second = "Hi! My name is Ada and I like lighthouses.", "What is my name, and what do I like?"
    with Engine(tlm_dir, name="test-tlm-chat", cache_ratio=0.05) as eng:
        kept = eng.chat_turns([first, second], max_new_tokens=48)
        apart = pd.concat([eng.chat_turns([first], max_new_tokens=48), eng.chat_turns([second], max_new_tokens=48)])
    print(eng.backend, kept.to_string(), apart.to_string(), sep="\n")
    assert bool(kept["history kept"].iloc[1]), kept.to_string()
    dropped = history_kept(apart.drop(columns="history kept").to_dict(orient="records"))
    assert dropped[1]["history kept"] is not None and not dropped[1]["history kept"], apart.to_string()
