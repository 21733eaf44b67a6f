"""labkit.vision (lab 05): generated:tiny-vl, image loading and its errors, resizing, and the token cost
predicted before a run, checked against the real transformers processor and lmdeploy's own InternVL
preprocessor and PyTorch-engine model code (all on CPU; lab 05's notebook runs the engine on a GPU)."""
from __future__ import annotations

import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from labkit import models, vision
from labkit.serve import free_port
from labkit.vision import ImageError, ImageTooLargeError

SIZES = [(256, 256), (512, 512), (800, 200), (3840, 2160), (4000, 3000), (448, 336), (448, 252), (896, 896),
         (897, 896), (1000, 1000), (1920, 1080), (500, 400), (100, 1000), (300, 7000), (1, 1), (6000, 4000),
         (1344, 1344), (2000, 900), (672, 448)]


@pytest.fixture(scope="module")
def tiny_vl() -> Path:
    return models.resolve("generated:tiny-vl")


@pytest.fixture(scope="module")
def samples() -> dict[str, Path]:
    return vision.sample_images()


@pytest.fixture(scope="module")
def lmdeploy_vl(tiny_vl):
    """lmdeploy 0.18's own vision preprocessor for the model (what the pipeline and api_server run), on CPU."""
    from lmdeploy.vl.model.builder import load_vl_model

    return load_vl_model(str(tiny_vl), backend="pytorch")


def _lmdeploy_image_tokens(vl_model, img) -> tuple[int, int]:
    out = vl_model.preprocess([{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                            {"type": "image", "data": img}]}])
    pre = out[-1]["content"][0]
    return int(pre["image_tokens"]), int(pre["pixel_values"].shape[0])


# --------------------------------------------------------------------------------------- tiny-vl


def test_tiny_vl_is_an_hf_internvl_with_the_image_token_in_its_tokenizer(tiny_vl):
    from transformers import AutoTokenizer

    cfg = json.loads((tiny_vl / "config.json").read_text())
    assert cfg["architectures"] == ["InternVLForConditionalGeneration"] and "auto_map" not in cfg
    tok = AutoTokenizer.from_pretrained(tiny_vl)
    assert len(tok) == cfg["text_config"]["vocab_size"]
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == cfg["image_token_id"] == tok.context_image_token_id
    assert tok.encode("<img><IMG_CONTEXT></img>") == [tok.start_image_token_id, cfg["image_token_id"],
                                                      tok.end_image_token_id]
    assert vision.vision_spec(tiny_vl) == vision.VisionSpec("InternVLForConditionalGeneration", 448, 1, 12, True,
                                                            256, True)


def test_tiny_vl_is_deterministic(tiny_vl, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from labkit import generate

    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    again = generate.ensure("tiny-vl", quiet=True)
    assert again != tiny_vl
    a, b = load_file(tiny_vl / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    for name in ("tokenizer.json", "config.json", "processor_config.json", "chat_template.jinja"):
        assert (tiny_vl / name).read_text() == (again / name).read_text(), name


def test_tiny_vl_runs_in_transformers_with_an_image(tiny_vl, samples):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_vl)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl, dtype=torch.float32)
    img = vision.load(samples["text"])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n<IMG_CONTEXT>\nRead it.<|im_end|>\n<|im_start|>assistant\n"
    inputs = proc(images=[img], text=prompt, return_tensors="pt")
    # transformers' processor spends exactly the tokens labkit predicted
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == vision.token_cost(tiny_vl, img) == 1280
    assert inputs["pixel_values"].shape == (5, 3, 448, 448)
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_lmdeploy_engine_model_loads_tiny_vl_and_sees_what_transformers_sees(tiny_vl):
    """lmdeploy's PyTorch-engine InternVL (the code the GPU engine runs) loads every tiny-vl weight by name,
    and its vision tower + projector compute the same image features as transformers'."""
    import torch
    from lmdeploy.pytorch.models.internvl3_hf import InternVLForConditionalGeneration as LmdInternVL
    from lmdeploy.pytorch.weight_loader.model_weight_loader import ModelWeightLoader
    from transformers import AutoConfig, InternVLForConditionalGeneration

    lmd = LmdInternVL(AutoConfig.from_pretrained(tiny_vl), None, dtype=torch.float32, device="cpu")
    ModelWeightLoader(str(tiny_vl)).load_model_weights(lmd, device="cpu")  # KeyError on any unknown name
    hf = InternVLForConditionalGeneration.from_pretrained(tiny_vl, dtype=torch.float32).eval()
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 448, 448)
    with torch.no_grad():
        ours = lmd.get_image_features(pixels, -1, "default")
        theirs = hf.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                             vision_feature_select_strategy="default")
    theirs = getattr(theirs, "pooler_output", theirs)
    assert ours.shape == (2, 256, 256)
    assert torch.allclose(ours, theirs.reshape(ours.shape), atol=1e-4)
    lp, hp = dict(lmd.named_parameters()), dict(hf.named_parameters())
    assert torch.equal(lp["language_model.lm_head.weight"], hp["lm_head.weight"])
    assert torch.equal(lp["language_model.model.embed_tokens.weight"], hp["model.language_model.embed_tokens.weight"])
    q = hp["model.language_model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(lp["language_model.model.layers.1.self_attn.qkv_proj.weight"][: q.shape[0]], q)


def test_lmdeploy_preprocessor_needs_no_transformers5_fix_and_matches_token_cost(tiny_vl, samples, lmdeploy_vl):
    """lmdeploy 0.18's InternVL preprocessor runs under the installed transformers (5.x) without the llava-hf fix,
    and spends exactly the tokens labkit predicts, for every sample image and shape."""
    from PIL import Image

    assert type(lmdeploy_vl).__name__ == "InternVL3VisionModel"
    for name in ("circle", "chart", "text", "large"):
        img = vision.load(samples[name])
        tokens, tiles = _lmdeploy_image_tokens(lmdeploy_vl, img)
        assert (tokens, tiles) == (vision.token_cost(tiny_vl, img), vision.tiles(tiny_vl, img)), name
    for size in [(4000, 3000), (448, 336), (448, 252), (896, 896), (100, 1000), (1920, 1080)]:
        tokens, _ = _lmdeploy_image_tokens(lmdeploy_vl, Image.new("RGB", size, "white"))
        assert tokens == vision.token_cost(tiny_vl, size), size


def test_lmdeploy_prompt_has_the_predicted_image_tokens(tiny_vl, samples, lmdeploy_vl):
    from lmdeploy.model import get_chat_template
    from lmdeploy.tokenizer import Tokenizer

    img = vision.load(samples["circle"])
    msgs = lmdeploy_vl.preprocess([{"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                                                {"type": "image", "data": img}]}])
    out = lmdeploy_vl.to_pytorch(msgs, get_chat_template(str(tiny_vl)), Tokenizer(str(tiny_vl)))
    assert out["prompt"] == ("<|im_start|>user\nDescribe it.<img><IMG_CONTEXT></img>\n<|im_end|>\n"
                             "<|im_start|>assistant\n")
    assert out["input_ids"].count(lmdeploy_vl.image_token_id) == vision.token_cost(tiny_vl, img) == 256


def test_pipeline_prompts_carry_the_predicted_tokens(tiny_vl, samples):
    """What lmdeploy's pipeline and api_server do with a request before the GPU: MultimodalProcessor + the
    InternVL preprocessor (run here on CPU). Every prompt form of lab 05 reaches the engine with exactly
    the predicted image tokens; the 4K picture alone overflows a 2048-token session; a non-image fails."""
    import asyncio
    import base64

    from lmdeploy import PytorchEngineConfig
    from lmdeploy.model import get_chat_template
    from lmdeploy.serve.processors import MultimodalProcessor
    from lmdeploy.tokenizer import Tokenizer
    from lmdeploy.vl.engine import ImageEncoder
    from PIL import UnidentifiedImageError

    path = str(tiny_vl)
    encoder = ImageEncoder(path, "pytorch", backend_config=PytorchEngineConfig(dtype="float16"))
    proc = MultimodalProcessor(Tokenizer(path), get_chat_template(path), vl_encoder=encoder, backend="pytorch")

    def input_len(prompt) -> int:
        messages = MultimodalProcessor.format_prompts(prompt)[0] if isinstance(prompt, tuple) else prompt
        return len(asyncio.run(proc.get_prompt_input(prompt=messages, do_preprocess=True))["input_ids"])

    imgs = {k: vision.load(samples[k]) for k in ("circle", "chart", "text", "large")}
    lens = {k: input_len(("What is in this picture?", img)) for k, img in imgs.items()}
    text_part = {k: lens[k] - vision.token_cost(tiny_vl, img) for k, img in imgs.items()}
    assert len(set(text_part.values())) == 1, text_part  # the rest is the same text prompt
    assert lens["large"] > 2048 and vision.fits(tiny_vl, imgs["large"], 2048, prompt_tokens=0, max_new_tokens=0).ok is False
    assert input_len(("What is in this picture?", vision.resize_longest(imgs["large"], 448))) < 1024
    two = vision.user_message("What is in this picture?", imgs["circle"], imgs["chart"])
    assert input_len([two]) == lens["circle"] + 256 + vision.IMAGE_WRAP_TOKENS
    raw = "data:image/png;base64," + base64.b64encode(samples["not_image"].read_bytes()).decode()
    with pytest.raises(UnidentifiedImageError):  # the engine answers this request with finish_reason 'error'
        input_len([{"role": "user", "content": [{"type": "text", "text": "?"},
                                                {"type": "image_url", "image_url": {"url": raw}}]}])


# --------------------------------------------------------------------------------------- token cost


def test_token_cost_matches_transformers_tiling_rule(tiny_vl):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_vl).image_processor
    for w, h in SIZES:
        expected = proc.get_number_of_image_patches(h, w, {"crop_to_patches": True})
        assert vision.tiles(tiny_vl, (w, h)) == expected, (w, h)
        assert vision.token_cost(tiny_vl, (w, h)) == 256 * expected


def test_token_cost_for_opengvlab_internvl_layout_matches_lmdeploy(tmp_path):
    """OpenGVLab/InternVL3-1B (the catalogue's remote-code layout) goes through lmdeploy's dynamic_preprocess."""
    from lmdeploy.vl.model.internvl import dynamic_preprocess
    from PIL import Image

    cfg = {"architectures": ["InternVLChatModel"], "dynamic_image_size": True, "force_image_size": 448,
           "max_dynamic_patch": 6, "min_dynamic_patch": 1, "use_thumbnail": True, "downsample_ratio": 0.5,
           "vision_config": {"image_size": 448, "patch_size": 14}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for w, h in SIZES[:12]:
        n = len(dynamic_preprocess(Image.new("RGB", (w, h)), 1, 6, 448, True))
        assert vision.tiles(tmp_path, (w, h)) == n, (w, h)
        assert vision.token_cost(tmp_path, (w, h)) == 256 * n


def test_token_cost_says_which_models_it_knows(tmp_path, tiny_dir):
    with pytest.raises(ImageError, match="predicts image tokens for InternVL models.*Qwen2ForCausalLM"):
        vision.token_cost(tiny_dir, (256, 256))
    with pytest.raises(ImageError, match="no config.json"):
        vision.token_cost(tmp_path, (256, 256))


def test_shape_not_size_decides_internvl_tiles(tiny_vl):
    # a 4:3 picture gets the 4x3 grid at any size; a 16:9 or square one shrinks with its size
    assert vision.token_cost(tiny_vl, (4000, 3000)) == vision.token_cost(tiny_vl, (448, 336)) == 13 * 256
    assert vision.token_cost(tiny_vl, (3840, 2160)) == 9 * 256
    assert vision.token_cost(tiny_vl, (448, 252)) == 3 * 256
    assert vision.token_cost(tiny_vl, (256, 256)) == 256


def test_fits_and_require_fit_explain_the_arithmetic(tiny_vl, samples):
    ok, why = vision.fits(tiny_vl, samples["large"], session_len=2048, prompt_tokens=64, max_new_tokens=256)
    assert not ok and "2,307 image tokens + 64 prompt + 256 reply = 2,627 > session_len 2,048" in why
    assert "finish_reason 'error'" in why
    ok, why = vision.fits(tiny_vl, (3840, 2160), session_len=2600, prompt_tokens=64, max_new_tokens=256)
    assert not ok and "cut after 229 tokens (finish_reason 'length')" in why
    assert vision.fits(tiny_vl, (3840, 2160), session_len=4096).ok
    assert vision.fits(tiny_vl, [(256, 256), (512, 512)], session_len=1024).ok
    with pytest.raises(ImageTooLargeError, match="Resize it .* or raise session_len to at least 2,627"):
        vision.require_fit(tiny_vl, samples["large"], 2048)
    with pytest.raises(ImageTooLargeError, match="Resizing does not help.*4x3 tiles"):
        vision.require_fit(tiny_vl, (4000, 3000), 2048)
    assert vision.require_fit(tiny_vl, samples["circle"], 2048) == 256


def test_fit_image_picks_the_largest_size_that_fits(tiny_vl, samples):
    from PIL import Image

    big = vision.load(samples["large"])
    fitted = vision.fit_image(tiny_vl, big, session_len=2048)
    assert fitted.size == (896, 504) and vision.fits(tiny_vl, fitted, 2048).ok
    assert vision.fit_image(tiny_vl, big, session_len=4096).size == big.size  # fits as it is
    with pytest.raises(ImageTooLargeError, match="Resizing does not help"):
        vision.fit_image(tiny_vl, Image.new("RGB", (4000, 3000)), session_len=2048)


def test_cost_table(tiny_vl, samples):
    table = vision.cost_table(tiny_vl, {"large": samples["large"], "photo 4:3": (4000, 3000)}, session_lens=(2048, 4096))
    assert table.to_dict("records") == [
        {"image": "large", "size": "3840x2160", "tiles": 9, "image tokens": 2304, "fits 2048": "NO", "fits 4096": "yes"},
        {"image": "photo 4:3", "size": "4000x3000", "tiles": 13, "image tokens": 3328, "fits 2048": "NO",
         "fits 4096": "yes"}]


# --------------------------------------------------------------------------------------- images


def test_sample_images_have_known_sizes_and_are_made_once(samples):
    from PIL import Image

    for key, (name, size, _) in vision.SAMPLES.items():
        assert samples[key].name == name and Image.open(samples[key]).size == size
    stamp = samples["large"].stat().st_mtime_ns
    assert vision.sample_images()["large"].stat().st_mtime_ns == stamp
    px = vision.load(samples["circle"])
    assert px.getpixel((128, 128)) == (220, 20, 20) and px.getpixel((5, 5)) == (255, 255, 255)
    assert list(vision.describe_samples()["pixels"]) == ["256x256", "512x512", "800x200", "3840x2160"]


def test_load_from_path_bytes_pil_and_data_url_agree(samples):
    import numpy as np
    from lmdeploy.vl import load_image

    path = samples["chart"]
    a = np.asarray(vision.load(path))
    for src in (str(path), path.read_bytes(), vision.load(path), vision.data_url(path), load_image(str(path))):
        assert np.array_equal(np.asarray(vision.load(src)), a)
    rgba = vision.load(path).convert("RGBA")
    assert vision.load(rgba).mode == "RGB"


@pytest.mark.parametrize("key, message", [
    ("corrupt", "is a corrupt or truncated PNG file"),
    ("not_image", "is not an image PIL can read .*give a PNG, JPEG"),
    ("empty", r"is empty \(0 bytes\)"),
])
def test_bad_files_give_one_clear_error(samples, key, message):
    with pytest.raises(ImageError, match=message):
        vision.load(samples[key])


def test_truncated_file_is_refused_even_after_lmdeploy_relaxed_pil(samples):
    import lmdeploy.vl  # noqa: F401 - sets PIL's ImageFile.LOAD_TRUNCATED_IMAGES = True
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    with pytest.raises(ImageError, match="corrupt or truncated"):
        vision.load(samples["corrupt"])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # left as lmdeploy wants it


def test_missing_folder_empty_image_and_wrong_type(tmp_path):
    from PIL import Image

    with pytest.raises(ImageError, match="no image file at .*missing.png: check the path"):
        vision.load(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a folder"):
        vision.load(tmp_path)
    with pytest.raises(ImageError, match="is 0x0 pixels"):
        vision.load(Image.new("RGB", (10, 10)).crop((3, 3, 3, 3)))
    with pytest.raises(ImageError, match="cannot read an image from a int"):
        vision.load(42)
    with pytest.raises(ImageError, match="data URL must look like"):
        vision.load("data:image/png,abc")


def test_url_on_a_closed_port_fails_fast_and_clearly():
    port = free_port()
    with pytest.raises(ImageError, match=rf"could not fetch http://127.0.0.1:{port}/x.png \(ConnectError\)"):
        vision.load(f"http://127.0.0.1:{port}/x.png", timeout=2)


def test_url_that_never_answers_times_out():
    import time

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)  # accepts the connection, never answers
    try:
        start = time.perf_counter()
        with pytest.raises(ImageError, match=r"did not answer within 1 s"):
            vision.load(f"http://127.0.0.1:{srv.getsockname()[1]}/slow.png", timeout=1)
        assert time.perf_counter() - start < 5
    finally:
        srv.close()


def test_url_serving_an_image_and_a_404(samples):
    png = samples["circle"].read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/circle.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                self.wfile.write(png)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert vision.load(f"{base}/circle.png").size == (256, 256)
        with pytest.raises(ImageError, match="answered HTTP 404"):
            vision.load(f"{base}/nothing.png")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_resize_longest(samples):
    big = vision.load(samples["large"])
    assert vision.resize_longest(big, 448).size == (448, 252)
    assert vision.resize_longest(vision.load(samples["text"]), 400).size == (400, 100)
    small = vision.load(samples["circle"])
    assert vision.resize_longest(small, 1000).size == (256, 256)  # never enlarged
    for bad in (0, -3, 2.5):
        with pytest.raises(ImageError, match="whole number of pixels"):
            vision.resize_longest(small, bad)


def test_openai_message_carries_images_as_data_urls(samples):
    msg = vision.user_message("compare", samples["circle"], samples["chart"])
    assert msg["role"] == "user" and [p["type"] for p in msg["content"]] == ["text", "image_url", "image_url"]
    url = msg["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and vision.load(url).size == (256, 256)
    assert vision.data_url(samples["circle"], "JPEG").startswith("data:image/jpeg;base64,")


# --------------------------------------------------------------------------------------- memory


def test_weights_by_part_adds_up_to_the_model(tiny_vl):
    import torch
    from transformers import InternVLForConditionalGeneration

    table = vision.weights_by_part(tiny_vl).set_index("part")
    model = InternVLForConditionalGeneration.from_pretrained(tiny_vl, dtype=torch.bfloat16)
    assert table.loc["vision tower", "parameters"] == sum(p.numel() for p in model.model.vision_tower.parameters())
    assert table.loc["projector", "parameters"] == sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert table["parameters"].sum() == sum(p.numel() for p in model.parameters())
    assert abs(table["MiB"].sum() * 2**20 - (tiny_vl / "model.safetensors").stat().st_size) < 64 * 1024
    with pytest.raises(ImageError, match="no \\*.safetensors"):
        vision.weights_by_part(Path(io.__file__).parent)


# --------------------------------------------------------------------------------------- web UI upload


def test_webui_upload_becomes_checked_image_parts(samples):
    from labkit import webui

    upload = {"text": "What is this?", "files": [str(samples["circle"]), {"path": str(samples["chart"])}]}
    content = webui.check_upload(upload)
    assert content[0] == "What is this?" and [c["path"] for c in content[1:]] == [str(samples["circle"]),
                                                                                    str(samples["chart"])]
    msgs = webui.build_messages([{"role": "user", "content": content}, {"role": "assistant", "content": "a circle"}],
                                {"text": "and this?", "files": [str(samples["text"])]})
    first, last = msgs[0]["content"], msgs[2]["content"]
    assert [p["type"] for p in first] == ["text", "image_url", "image_url"]
    assert vision.load(first[1]["image_url"]["url"]).size == (256, 256)
    assert last[0] == {"type": "text", "text": "and this?"} and vision.load(last[1]["image_url"]["url"]).size == (800, 200)
    assert webui.check_upload({"text": "just text", "files": []}) == "just text"
    with pytest.raises(ImageError, match="corrupt or truncated"):
        webui.check_upload({"text": "look", "files": [str(samples["corrupt"])]})


def test_webui_for_a_vision_model_refuses_a_bad_upload_in_the_browser_api(samples, tmp_path):
    """The real Gradio app with its image upload, driven through its API: a corrupt picture is refused with
    labkit's message; a good one passes the check (and then needs a model, as any chat does)."""
    from gradio_client import Client, handle_file

    from labkit import serve, webui

    ui = webui.launch(f"http://127.0.0.1:{serve.free_port()}", vision=True)  # no server: checks come first
    try:
        client = Client(ui.url, verbose=False)
        with pytest.raises(Exception, match="corrupt or truncated"):
            client.predict({"text": "what is it?", "files": [handle_file(str(samples["corrupt"]))]}, None, "",
                           16, 0.8, 40, 0.7, api_name="/chat")
        with pytest.raises(Exception, match="pick a model first"):
            client.predict({"text": "what is it?", "files": [handle_file(str(samples["circle"]))]}, None, "",
                           16, 0.8, 40, 0.7, api_name="/chat")
    finally:
        ui.close()


def test_is_vision_model(tiny_vl, tiny_dir):
    assert vision.is_vision_model(tiny_vl) and not vision.is_vision_model(tiny_dir)


class _OpenAIStandIn(BaseHTTPRequestHandler):
    """Just enough of an OpenAI-compatible server for the web UI: /v1/models and a streamed chat reply.
    It keeps the requests it got, so the test sees what the UI really sent."""

    received: list = []

    def do_GET(self):  # noqa: N802
        body = json.dumps({"object": "list", "data": [{"id": "tiny-vl", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append(req)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in ("a red ", "circle"):
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": req["model"],
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece}, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


def test_webui_sends_the_uploaded_picture_to_the_server(samples):
    """The whole upload path of the real Gradio app: browser API -> check -> data URL in the request."""
    from gradio_client import Client, handle_file

    from labkit import webui

    _OpenAIStandIn.received = []
    httpd = HTTPServer(("127.0.0.1", 0), _OpenAIStandIn)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    ui = webui.launch(f"http://127.0.0.1:{httpd.server_address[1]}", vision=True)
    try:
        client = Client(ui.url, verbose=False)
        client.predict(api_name="/models")  # what the page does when it opens: fill the model picker
        text, chat = client.predict({"text": "What is this?", "files": [handle_file(str(samples["circle"]))]},
                                    "tiny-vl", "", 16, 0.8, 40, 0.7, api_name="/chat")
        assert [m["role"] for m in chat] == ["user", "assistant"], chat
        assert "a red circle" in json.dumps(chat[-1]["content"])
        sent = _OpenAIStandIn.received[-1]["messages"][-1]["content"]
        assert sent[0] == {"type": "text", "text": "What is this?"} and sent[1]["type"] == "image_url"
        assert vision.load(sent[1]["image_url"]["url"]).size == (256, 256)
        # the next turn: the app keeps the conversation (picture included) in this client's session
        client.predict({"text": "Sure?", "files": []}, "tiny-vl", "", 16, 0.8, 40, 0.7, api_name="/chat")
        turn2 = _OpenAIStandIn.received[-1]["messages"]
        assert [m["role"] for m in turn2] == ["user", "assistant", "user"]
        assert [p["type"] for p in turn2[0]["content"]] == ["text", "image_url"] and turn2[2]["content"] == "Sure?"
    finally:
        ui.close()
        httpd.shutdown()
        httpd.server_close()
