"""labkit.quant (lab 03): lmdeploy's AWQ really runs on CPU (the generated model and the trained one); bad
settings fail before any work; the calibration fallback says so; the course's command is checked with
lmdeploy's own CLI parser; the CPU quality checks (perplexity on held-out generated text, next-token
agreement of the dequantized weights) pass for the trained model's AWQ and fail for each deliberately
broken quantization and for a model that learned nothing."""
from __future__ import annotations

import json
import time

import pytest

from labkit import quant
from labkit.gpu import has_cuda
from labkit.quant import QuantError
from helpers import TINY, TRAINED, one_line

SMALL = dict(calib_samples=4, calib_seqlen=64)


@pytest.fixture(scope="module")
def awq_run(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("awq") / "tiny-awq"
    start = time.perf_counter()
    got = quant.awq(TINY, work_dir=out, device=None, **SMALL)
    return got, time.perf_counter() - start


def test_awq_runs_and_shrinks_the_model(awq_run, tiny_dir):
    out, seconds = awq_run
    print(f"AWQ on CPU took {seconds:.1f} s")
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["zero_point"]) == ("awq", 4, 128, True)
    assert quant.disk_size(out) < 0.7 * quant.disk_size(tiny_dir)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.down_proj.qweight" in keys and "model.layers.0.mlp.down_proj.weight" not in keys
    assert not any((out / name).exists() for name in quant.STATS_FILES)
    meta = quant.info(out)
    assert meta["params"]["calib_samples"] == 4 and meta["device"] == ("cuda" if has_cuda() else "cpu")
    table = quant.compare_sizes({"bf16": tiny_dir, "awq": out})
    assert table["vs first"].iloc[1] < 0.7


def test_awq_is_cached_and_the_swap_is_undone(awq_run, capsys):
    import lmdeploy.lite.apis.calibrate as calibrate_mod
    from lmdeploy.lite.utils import get_calib_loaders

    out, _ = awq_run
    assert calibrate_mod.get_calib_loaders is get_calib_loaders, "lmdeploy's calibration loader was not restored"
    start = time.perf_counter()
    again = quant.awq(TINY, work_dir=out, device=None, **SMALL)
    assert again == out and time.perf_counter() - start < 5
    assert "cached" in capsys.readouterr().out


def test_calibration_fallback_says_so(awq_run, monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1, and this machine may lack `datasets`: either way lmdeploy's hub sets
    # cannot load, and labkit must say it calibrates on its local corpus.
    out, _ = awq_run
    used = quant.info(out)["calibration"]
    assert used["kind"] == "local" and used["name"] == "corpus.txt"
    assert "calibrating on labkit's local corpus instead" in used["reason"]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: the probe fails fast
    src = quant.calibration_source()
    assert src.kind == "local" and ("not installed" in src.reason or "did not answer" in src.reason), src


def test_hub_loader_failure_falls_back_and_says_so(tiny_dir, capsys):
    import importlib.util

    from transformers import AutoTokenizer

    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("`datasets` is installed: lmdeploy's own loader would try the hub")
    import lmdeploy.lite.apis.calibrate as calibrate_mod

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    hub = quant.CalibSource("hub", "wikitext2", None, "pretend the hub answered")
    local = quant.calibration_source(probe=False)
    used: dict = {}
    with quant._calibration_loader(hub, local, tok, 3, 32, used):
        samples = calibrate_mod.get_calib_loaders("wikitext2", tok, nsamples=3, seqlen=32)
    assert [tuple(s.shape) for s in samples] == [(1, 32)] * 3
    assert used["source"]["kind"] == "local"
    assert "calibrating on labkit's local corpus instead" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, expect", [
    (dict(w_group_size=100), "w_group_size 100 does not divide the hidden size 256"),
    (dict(w_group_size=512), "does not divide"),
    (dict(w_group_size=0), "w_group_size must be a whole number >= 1"),
    (dict(w_bits=8), "w_bits must be 4"),
    (dict(w_bits=3), "w_bits must be 4"),
    (dict(calib_samples=0), "calib_samples must be a whole number >= 1"),
    (dict(calib_seqlen=-5), "calib_seqlen must be a whole number >= 1"),
    (dict(batch_size=0), "batch_size must be a whole number >= 1"),
    (dict(calib_dataset="ptb"), "removed in lmdeploy 0.12"),
])
def test_bad_settings_fail_before_any_work(kwargs, expect, tmp_path):
    out = tmp_path / "out"
    start = time.perf_counter()
    with pytest.raises(QuantError) as err:
        quant.awq(TINY, work_dir=out, device=None, **kwargs)
    assert expect in one_line(err)
    assert time.perf_counter() - start < 3, "the check must come before any model loads"
    assert not out.exists()


def test_check_params_reads_a_language_config(tiny_dir, tmp_path):
    """A vision model's text part under language_config: the shape of the text part, the model's own class."""
    inner = json.loads((tiny_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["SomeVLModel"], "language_config": inner}))
    got = quant.check_params(tmp_path)
    assert got == {**quant.check_params(tiny_dir), "architecture": "SomeVLModel"}
    assert got["layers"] == 2 and got["hidden size"] == 256


def test_cache_key_follows_every_weight_file(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    (tmp_path / "model.pt").write_bytes(b"x" * 10)
    before = quant._key(tmp_path, {}, "text:abc")
    (tmp_path / "model.pt").write_bytes(b"x" * 20)  # a *.pt checkpoint (labkit.models.WEIGHT_PATTERNS) changed
    assert quant._key(tmp_path, {}, "text:abc") != before


def test_calibration_file_missing_or_empty(tmp_path):
    with pytest.raises(QuantError) as err:
        quant.awq(TINY, work_dir=tmp_path / "a", device=None, calib_text=tmp_path / "nope.txt")
    assert "does not exist" in one_line(err)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(QuantError) as err:
        quant.awq(TINY, work_dir=tmp_path / "b", device=None, calib_text=empty)
    assert "is empty" in one_line(err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_too_little_calibration_text(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A short note about weights and activations. " * 5)
    start = time.perf_counter()
    with pytest.raises(QuantError) as err:
        quant.awq(TINY, work_dir=tmp_path / "out", device=None, calib_text=short, calib_samples=8, calib_seqlen=128)
    msg = one_line(err)
    assert "short.txt has" in msg and "8 x 128 = 1,024" in msg and "lower calib_samples" in msg
    assert time.perf_counter() - start < 60  # only the tokenizer loads, never the model
    assert not (tmp_path / "out").exists()


def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    from labkit.gpu import has_cuda

    if has_cuda():
        pytest.skip("this machine has a GPU")
    with pytest.raises(QuantError) as err:
        quant.awq(TINY, work_dir=tmp_path / "out", device="cuda")
    assert "use device='cpu'" in one_line(err)


def test_course_command_vs_lmdeploy_018_parser():
    ok, msg = quant.check_command(quant.course_command("m", "out"))
    assert not ok and "invalid choice: 'ptb'" in msg
    ok, msg = quant.check_command(quant.course_command("m", "out").replace("ptb", "wikitext2"))
    assert not ok and "unrecognized arguments: False" in msg
    assert quant.check_command(quant.current_command("m", "out")) == (True, "accepted")
    assert quant.check_command(quant.current_command("m", "out", search_scale=True, device="cpu"))[0]
    table = quant.command_changes("m", "out")
    assert table["lmdeploy 0.18 says"].tolist()[-1] == "accepted"
    assert sum(s != "accepted" for s in table["lmdeploy 0.18 says"]) == 3
    flags = quant.cli_flags().set_index("flag")
    assert flags.loc["--search-scale", "kind"] == "switch (no value)"
    assert "ptb" not in flags.loc["--calib-dataset", "choices"] and "wikitext2" in flags.loc["--calib-dataset", "choices"]


def test_next_token_agreement_on_cpu(awq_run, tiny_dir):
    out, _ = awq_run
    got = quant.next_token_agreement(tiny_dir, out, seqlen=128, windows=2)
    print(got)
    assert got["tokens"] == 256
    assert got["top-1 agreement"] > 0.5 > 100 * got["chance agreement"]
    assert 0 <= got["KL mean (nats)"] < 0.05


def test_dequantized_model_refuses_a_foreign_model(awq_run, tmp_path):
    from labkit.generate import Spec, build_chat_model

    other = tmp_path / "other"
    build_chat_model(Spec(hidden=128, intermediate=256, layers=1, heads=2, kv_heads=1, vocab=4096), other)
    out, _ = awq_run
    with pytest.raises((QuantError, RuntimeError)):
        quant.dequantized_model(out, other)


# ----------------------------------------------------------------------------- quality on the trained model

@pytest.fixture(scope="module")
def trained_awq(tmp_path_factory):
    from labkit.models import resolve

    model_dir = resolve(TRAINED)
    out = quant.awq(model_dir, work_dir=tmp_path_factory.mktemp("awq-trained") / "t", device=None,
                    calib_samples=8, calib_seqlen=128)
    return model_dir, out


def test_a_second_awq_in_the_same_process_on_a_model_with_fewer_layers(trained_awq, tmp_path):
    """A student who changes MODEL and runs lab 03's AWQ cell again in the same kernel: the 2-layer tiny-chat after
    the 3-layer trained model (lmdeploy's observer registry outlived the first run: KeyError, before the fix)."""
    out = quant.awq(TINY, work_dir=tmp_path / "again", device=None, **SMALL)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"


def test_trained_model_is_calibrated_on_its_own_kind_of_text(trained_awq):
    used = quant.info(trained_awq[1])["calibration"]
    assert used["kind"] == "local" and used["name"].startswith("calib-qwen2-"), used


def test_awq_of_the_trained_model_passes_the_labs_quality_checks(trained_awq):
    q = quant.quality(*trained_awq, windows=4)
    print(q)
    checks = quant.quality_checks(q, trained=True)
    assert all(ok for _, ok, _ in checks), checks
    assert q["text"].startswith("chat-c")  # held-out generated conversations, not the prose file


@pytest.mark.parametrize("how", quant.BREAKS)
def test_each_broken_quantization_fails_the_checks(trained_awq, tmp_path, how):
    model_dir, out = trained_awq
    q = quant.quality(model_dir, quant.broken_copy(out, how, tmp_path / "broken"), windows=4)
    print(how, q)
    failed = [what for what, ok, _ in quant.quality_checks(q, trained=True) if not ok]
    assert failed, f"{how}: every check passed"
    if how == "dropped tensor":
        assert "lacks 1 tensor(s)" in q["error"] and "down_proj" in q["error"]
    if how == "wrong group size":
        assert "does not match the weights" in q["error"]
    if how == "scales x3":
        assert q["perplexity ratio"] > quant.AWQ_PPL_BOUND


def test_broken_quality_table_fails_every_copy(trained_awq, tmp_path):
    table = quant.broken_quality(*trained_awq, tmp_path, windows=2)
    print(table.to_string())
    assert table["broken copy"].tolist() == list(quant.BREAKS) and (table["checks failed"] > 0).all()


def test_a_model_that_learned_nothing_fails_the_trained_check(awq_run, tiny_dir):
    """The random generated model on the same held-out text: its perplexity is about its vocabulary size."""
    q = quant.quality(tiny_dir, awq_run[0], text=quant.heldout_text(), seqlen=128, windows=2)
    checks = dict((what, ok) for what, ok, _ in quant.quality_checks(q, trained=True))
    print(q["perplexity original"], checks)
    assert q["perplexity original"] > 100 * quant.TRAINED_PPL_MAX
    assert not checks[f"the original is a trained model: perplexity below {quant.TRAINED_PPL_MAX}"]


def test_dropped_mlp_tensors_are_refused_not_read_as_perfect(awq_run, tiny_dir, tmp_path):
    """The issue's case: every MLP tensor deleted from the AWQ files used to give 89.5% agreement."""
    from safetensors.torch import load_file, save_file

    out, _ = awq_run
    cut = tmp_path / "no-mlp"
    import shutil

    shutil.copytree(out, cut)
    state = load_file(str(cut / "model.safetensors"))
    save_file({k: v for k, v in state.items() if ".mlp." not in k}, str(cut / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(QuantError) as err:
        quant.next_token_agreement(tiny_dir, cut, seqlen=64, windows=1)
    assert "lacks 6 tensor(s)" in one_line(err) and "quantize again" in str(err.value)
