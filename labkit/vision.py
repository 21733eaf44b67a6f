"""Vision-language work for lab 05: images in, image tokens predicted, and a generated VL model.

- `load(src)` reads an image from a path, a URL, bytes or a PIL image, with one clear error
  (`ImageError`) for a missing file, a URL that does not answer, a file that is not an image,
  a corrupt or truncated file, or a 0x0 image.
- `token_cost(model_dir, image)` predicts how many image tokens lmdeploy 0.18 spends on an image
  BEFORE it runs, by mirroring its InternVL preprocessors (`lmdeploy/vl/model/internvl3_hf.py`,
  `internvl.py`): the image is cut into tiles of 448x448 on the grid whose aspect ratio is closest
  to the image's (up to 12 tiles, plus a thumbnail), each tile costs 256 tokens. `fits`,
  `require_fit` and `fit_image` turn that into a yes/no before any GPU work.
- `sample_images()` writes the lab's pictures (generated, deterministic) under LABKIT_HOME.
- `generated:tiny-vl`: a random-weight InternVL in transformers' own layout
  (`InternVLForConditionalGeneration`, no remote code), which lmdeploy 0.18's PyTorch engine and
  its InternVL preprocessor load as they load OpenGVLab/InternVL3-1B-hf. Its text tower is
  tiny-chat's Qwen2 shape; its tiles, patches and image tokens have InternVL3's real geometry.

No transformers-5 fix is applied, because this path needs none: lmdeploy 0.18's InternVL
preprocessor calls the transformers processor the way transformers 5 expects (tests/test_vision.py
runs it). The failure the GPU runner README describes (torchvision CLIP processor +
`input_data_format='channels_last'`) is in lmdeploy's llava-hf preprocessor only.
Used by lab 05 and by labkit.webui's image upload.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from labkit import config, generate
from labkit.errors import LabkitError

if TYPE_CHECKING:
    from PIL.Image import Image

TINY_VL_VERSION = 1      # bump when the files of generated:tiny-vl change
IMAGES_VERSION = 1       # bump when sample_images() draws something else
URL_TIMEOUT = 5.0        # seconds a URL gets to answer
IMAGE_WRAP_TOKENS = 3    # InternVL writes each image as <img>...</img> plus a newline
DEFAULT_PROMPT_TOKENS = 64  # a short question plus the chat template around it
INTERNVL_ARCHS = ("InternVLForConditionalGeneration", "InternS1ForConditionalGeneration")
LEGACY_INTERNVL_ARCHS = ("InternVLChatModel",)


class ImageError(LabkitError, ValueError):
    """An image could not be read or used; the message says what to do next."""


class ImageTooLargeError(ImageError):
    """An image needs more tokens than the session leaves, even after resizing."""


# ---------------------------------------------------------------------------------------------
# Loading


def _pil():
    from PIL import Image, ImageFile

    return Image, ImageFile


@contextlib.contextmanager
def _strict_decoding():
    """Refuse truncated files while decoding (importing lmdeploy.vl turns PIL's check off globally)."""
    _, ImageFile = _pil()
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def _checked(img: "Image", what: str) -> "Image":
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageError(f"{what} is {w}x{h} pixels: an empty image has nothing to look at; "
                         f"check how it was made (a crop with equal corners gives 0x0)")
    return img if img.mode == "RGB" else img.convert("RGB")


def _decode(data: bytes, what: str) -> "Image":
    Image, _ = _pil()
    if not data:
        raise ImageError(f"{what} is empty (0 bytes): re-save or re-download the image")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageError(f"{what} is too large to decode safely ({err}); resize it first") from err
    except Exception as err:  # UnidentifiedImageError and friends
        raise ImageError(f"{what} is not an image PIL can read ({len(data):,} bytes, starts with "
                         f"{data[:8]!r}): give a PNG, JPEG, GIF, BMP or WebP file") from err
    try:
        with _strict_decoding():
            img.load()
    except Exception as err:
        raise ImageError(f"{what} is a corrupt or truncated {img.format or 'image'} file "
                         f"({type(err).__name__}: {err}): re-save or re-download it") from err
    return _checked(img, what)


def _fetch(url: str, timeout: float) -> bytes:
    import httpx  # proxy settings honoured: the picture is on the internet

    try:
        resp = httpx.get(url, timeout=timeout, headers={"User-Agent": "labkit"}, follow_redirects=True)
    except httpx.TimeoutException as err:
        raise ImageError(f"{url} did not answer within {timeout:g} s: check the address and your network, "
                         f"or download the image and give its path") from err
    except httpx.HTTPError as err:
        raise ImageError(f"could not fetch {url} ({type(err).__name__}): check the address and your network, "
                         f"or download the image and give its path") from err
    if resp.status_code != 200:
        raise ImageError(f"{url} answered HTTP {resp.status_code}, not an image: check the address")
    return resp.content


def load(src: Any, timeout: float = URL_TIMEOUT) -> "Image":
    """An RGB PIL image from a path, an http(s) or data URL, bytes, or a PIL image; ImageError if unusable."""
    Image, _ = _pil()
    if isinstance(src, Image.Image):
        try:
            with _strict_decoding():
                src.load()
        except Exception as err:
            raise ImageError(f"the PIL image cannot be decoded ({type(err).__name__}: {err})") from err
        return _checked(src, "the PIL image")
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _decode(bytes(src), "the image bytes")
    if isinstance(src, str) and src.startswith(("http://", "https://")):
        return _decode(_fetch(src, timeout), src)
    if isinstance(src, str) and src.startswith("data:"):
        head, _, payload = src.partition(",")
        if ";base64" not in head or not payload:
            raise ImageError("a data URL must look like data:image/png;base64,<data>")
        try:
            data = base64.b64decode(payload, validate=False)
        except ValueError as err:
            raise ImageError(f"the data URL holds no valid base64 ({err})") from err
        return _decode(data, "the data URL")
    if isinstance(src, (str, os.PathLike)):
        path = Path(src).expanduser()
        if not path.exists():
            raise ImageError(f"no image file at {path}: check the path "
                             f"(labkit.vision.sample_images() lists the lab's pictures)")
        if path.is_dir():
            raise ImageError(f"{path} is a folder: give one image file inside it")
        return _decode(path.read_bytes(), str(path))
    raise ImageError(f"cannot read an image from a {type(src).__name__}: give a path, a URL, bytes or a PIL image")


def resize_longest(img: "Image", n: int) -> "Image":
    """A copy of `img` whose longest side is `n` pixels (aspect ratio kept; never enlarged)."""
    if not isinstance(n, int) or n < 1:
        raise ImageError(f"the longest side must be a whole number of pixels >= 1, not {n!r}")
    img = load(img)
    size = _scaled(img.size, n)
    if size == img.size:
        return img.copy()
    Image, _ = _pil()
    return img.resize(size, Image.Resampling.BICUBIC)


def show(images: dict[str, Any], height: float = 2.2) -> None:
    """Show named images side by side (titles give their pixel sizes), in a notebook or a script."""
    import matplotlib.pyplot as plt

    loaded = {name: load(img) for name, img in images.items()}
    fig, axes = plt.subplots(1, len(loaded), figsize=(height * 1.5 * len(loaded), height), squeeze=False)
    for ax, (name, img) in zip(axes[0], loaded.items()):
        thumb = resize_longest(img, 512)  # drawing a 4K picture at this size needs no more pixels
        ax.imshow(thumb)
        ax.set_title(f"{name}\n{img.size[0]}x{img.size[1]}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    plt.show()


def data_url(img: Any, fmt: str = "PNG") -> str:
    """The image as a base64 data URL, the form the OpenAI API carries images in."""
    img = load(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt.upper() == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_part(img: Any, fmt: str = "PNG") -> dict:
    """An OpenAI content part for an image: {'type': 'image_url', 'image_url': {'url': data URL}}."""
    return {"type": "image_url", "image_url": {"url": data_url(img, fmt)}}


def user_message(text: str, *images: Any, fmt: str = "PNG") -> dict:
    """An OpenAI-style user message: the text, then each image as a data URL (pipeline and server both take it)."""
    return {"role": "user", "content": [{"type": "text", "text": text}] + [image_part(i, fmt) for i in images]}


# ---------------------------------------------------------------------------------------------
# Token cost: mirrors lmdeploy 0.18's InternVL preprocessors


@dataclass(frozen=True)
class VisionSpec:
    """How a model turns an image into tokens (read from its config files)."""

    arch: str
    tile: int              # side of one square tile, pixels
    min_tiles: int
    max_tiles: int
    thumbnail: bool        # a whole-image thumbnail tile is added when there is more than one tile
    tokens_per_tile: int
    dynamic: bool          # False: one tile per image whatever its size


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


@functools.lru_cache(maxsize=16)
def _spec_cached(model_dir: str, mtime: float) -> VisionSpec:
    d = Path(model_dir)
    cfg = _read_json(d / "config.json")
    arch = (cfg.get("architectures") or [""])[0]
    if arch in INTERNVL_ARCHS:
        # transformers 5 writes processor_config.json; hub folders carry preprocessor_config.json
        proc = _read_json(d / "processor_config.json")
        image_proc = proc.get("image_processor") or _read_json(d / "preprocessor_config.json")
        size = image_proc.get("size") or {"height": 448, "width": 448}
        tile = int(size.get("height") or size.get("shortest_edge") or 448)
        seq = proc.get("image_seq_length") or cfg.get("image_seq_length") or 256
        # lmdeploy passes crop_to_patches=True itself, whatever the folder says
        return VisionSpec(arch, tile, int(image_proc.get("min_patches", 1)), int(image_proc.get("max_patches", 12)),
                          True, int(seq), True)
    if arch in LEGACY_INTERNVL_ARCHS:
        vision = cfg.get("vision_config") or {}
        tile = int(cfg.get("force_image_size") or vision.get("image_size") or 448)
        patch = int(vision.get("patch_size") or 14)
        per_tile = int((tile // patch) ** 2 * cfg.get("downsample_ratio", 0.5) ** 2)
        dynamic = bool(cfg.get("dynamic_image_size", False)) or not (d / "preprocessor_config.json").is_file()
        return VisionSpec(arch, tile, int(cfg.get("min_dynamic_patch", 1)), int(cfg.get("max_dynamic_patch", 12)),
                          bool(cfg.get("use_thumbnail", False)), per_tile, dynamic)
    raise ImageError(f"labkit predicts image tokens for InternVL models (transformers' "
                     f"InternVLForConditionalGeneration or OpenGVLab's InternVLChatModel); {d.name} is "
                     f"{arch or 'of unknown architecture'}: use InternVL3-1B, or generated:tiny-vl")


def is_vision_model(model_dir: str | Path) -> bool:
    """True when the model folder holds a vision-language model (its config has a vision part)."""
    cfg = _read_json(Path(model_dir) / "config.json")
    return "vision_config" in cfg or (cfg.get("architectures") or [""])[0] in INTERNVL_ARCHS + LEGACY_INTERNVL_ARCHS


def vision_spec(model_dir: str | Path) -> VisionSpec:
    """How the model at `model_dir` turns images into tokens; ImageError for a model labkit cannot predict."""
    d = Path(model_dir)
    cfg = d / "config.json"
    if not cfg.is_file():
        raise ImageError(f"{d} holds no config.json: give a model folder (labkit.resolve(...))")
    return _spec_cached(str(d.resolve()), cfg.stat().st_mtime)


def tile_grid(width: int, height: int, spec: VisionSpec) -> tuple[int, int]:
    """(columns, rows) of tiles InternVL cuts a width x height image into (its `dynamic_preprocess`)."""
    lo, hi = spec.min_tiles, spec.max_tiles
    if not spec.dynamic or hi <= 1:
        return (1, 1)
    # the order transformers' GotOcr2 processor tries the grids in: fewest tiles first
    ratios = sorted([(i, j) for i in range(1, hi + 1) for j in range(1, hi + 1) if lo <= i * j <= hi],
                    key=lambda r: r[0] * r[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in ratios:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * spec.tile * spec.tile * cols * rows:
            best = (cols, rows)  # same shape: a big image earns more tiles
    return best


def _size(image: Any) -> tuple[int, int]:
    if isinstance(image, tuple) and len(image) == 2 and all(isinstance(v, int) for v in image):
        w, h = image
        if w < 1 or h < 1:
            raise ImageError(f"an image of {w}x{h} pixels is empty: nothing to predict")
        return w, h
    return load(image).size


def tiles(model_dir: str | Path, image: Any) -> int:
    """How many 448x448 tiles (thumbnail included) the model's preprocessor makes of `image`."""
    spec = vision_spec(model_dir)
    cols, rows = tile_grid(*_size(image), spec)
    n = cols * rows
    return n + 1 if spec.thumbnail and n > 1 else n


def token_cost(model_dir: str | Path, image: Any) -> int:
    """Image tokens lmdeploy will spend on `image` (a PIL image, a path, or a (width, height) size)."""
    return tiles(model_dir, image) * vision_spec(model_dir).tokens_per_tile


class Fit(NamedTuple):
    """Whether a request fits its session, and the arithmetic that says so."""

    ok: bool
    why: str


def fits(model_dir: str | Path, image: Any, session_len: int, prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
         max_new_tokens: int = 256) -> Fit:
    """(ok, why): do the image (or a list of images) + a prompt + the reply fit in `session_len` tokens?"""
    images = image if isinstance(image, list) else [image]
    cost = sum(token_cost(model_dir, i) + IMAGE_WRAP_TOKENS for i in images)
    need = cost + prompt_tokens + max_new_tokens
    what = f"{cost:,} image tokens + {prompt_tokens:,} prompt + {max_new_tokens:,} reply = {need:,}"
    if need <= session_len:
        return Fit(True, f"fits: {what} <= session_len {session_len:,}")
    if cost + prompt_tokens >= session_len:
        return Fit(False, f"does not fit: {what} > session_len {session_len:,}; the prompt alone "
                          f"({cost + prompt_tokens:,}) fills the session, so the engine refuses it "
                          f"(finish_reason 'error')")
    room = session_len - cost - prompt_tokens
    return Fit(False, f"does not fit: {what} > session_len {session_len:,}; the reply is cut "
                      f"after {room:,} tokens (finish_reason 'length')")


def require_fit(model_dir: str | Path, image: Any, session_len: int, prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
                max_new_tokens: int = 256) -> int:
    """The image's token cost if the request fits, else ImageTooLargeError saying how to make it fit."""
    image = _size(image)
    ok, why = fits(model_dir, image, session_len, prompt_tokens, max_new_tokens)
    if ok:
        return token_cost(model_dir, image)
    raise ImageTooLargeError(f"{why}. {_advice(model_dir, image, session_len, prompt_tokens, max_new_tokens)}")


def _advice(model_dir, image, session_len: int, prompt_tokens: int, max_new_tokens: int) -> str:
    spec = vision_spec(model_dir)
    w, h = _size(image)
    need = token_cost(model_dir, (w, h)) + IMAGE_WRAP_TOKENS + prompt_tokens + max_new_tokens
    smallest = token_cost(model_dir, _scaled((w, h), spec.tile))
    if smallest + IMAGE_WRAP_TOKENS + prompt_tokens + max_new_tokens <= session_len:
        return (f"Resize it (labkit.vision.fit_image / resize_longest) or raise session_len to at least "
                f"{need:,}")
    cols, rows = tile_grid(w, h, spec)
    return (f"Resizing does not help: InternVL picks the tile grid from the image's shape ({w}x{h} -> "
            f"{cols}x{rows} tiles, plus a thumbnail, at any size). Raise session_len to at least {need:,}, "
            f"crop the image, or ask for fewer tokens")


def _scaled(size: tuple[int, int], n: int) -> tuple[int, int]:
    w, h = size
    if max(w, h) <= n:
        return w, h
    s = n / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def fit_image(model_dir: str | Path, image: Any, session_len: int, prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
              max_new_tokens: int = 256, sides: tuple[int, ...] = (2048, 1344, 896, 448, 224)) -> "Image":
    """The image if it fits the session, else its largest resize_longest(image, n) that does; ImageTooLargeError if none."""
    img = load(image)
    if fits(model_dir, img, session_len, prompt_tokens, max_new_tokens).ok:
        return img
    for n in sides:
        if n < max(img.size) and fits(model_dir, _scaled(img.size, n), session_len, prompt_tokens, max_new_tokens).ok:
            return resize_longest(img, n)
    require_fit(model_dir, img, session_len, prompt_tokens, max_new_tokens)  # raises with the arithmetic
    raise AssertionError("unreachable")


def cost_table(model_dir: str | Path, images: dict[str, Any], session_lens: tuple[int, ...] = (2048, 4096, 8192),
               prompt_tokens: int = DEFAULT_PROMPT_TOKENS, max_new_tokens: int = 256):
    """A table: for each named image (or (w, h) size), its tiles, image tokens, and whether it fits each session_len."""
    import pandas as pd

    rows = []
    for name, image in images.items():
        w, h = _size(image)
        row = {"image": name, "size": f"{w}x{h}", "tiles": tiles(model_dir, (w, h)),
               "image tokens": token_cost(model_dir, (w, h))}
        for s in session_lens:
            row[f"fits {s}"] = "yes" if fits(model_dir, (w, h), s, prompt_tokens, max_new_tokens).ok else "NO"
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Memory: what the weights of each part weigh (read from the safetensors headers, no torch)

_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
PARTS = (("vision tower", ("vision_tower", "vision_model")),
         ("projector", ("multi_modal_projector", "mlp1")),
         ("language model", ("",)))


def _part(name: str) -> str:
    return next(part for part, keys in PARTS if any(k in name for k in keys))  # "" matches every name


def weights_by_part(model_dir: str | Path):
    """A table of parameters and bytes per part (vision tower, projector, language model), from the safetensors."""
    import pandas as pd

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ImageError(f"{model_dir} has no *.safetensors files to read the weights from")
    totals: dict[str, list[int]] = {p: [0, 0] for p, _ in PARTS}
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = math.prod(meta["shape"])
            totals[_part(name)][0] += count
            totals[_part(name)][1] += count * _DTYPE_BYTES.get(meta["dtype"], 2)
    df = pd.DataFrame([{"part": p, "parameters": c, "MiB": b / 2**20} for p, (c, b) in totals.items()])
    df["share %"] = 100 * df["MiB"] / df["MiB"].sum()
    return df.round(2)


# ---------------------------------------------------------------------------------------------
# Sample images

SAMPLES = {
    "circle": ("red-circle.png", (256, 256), "a red circle on white"),
    "chart": ("bar-chart.png", (512, 512), "four blue bars of heights 3, 7, 5, 2 on white"),
    "text": ("text.png", (800, 200), "black text 'LMDeploy Lab 05' on white"),
    "large": ("large-3840x2160.jpg", (3840, 2160), "a 4K (16:9) photo-like scene: sky, sun, hills"),
}
BAD_SAMPLES = {
    "corrupt": ("corrupt.png", "a bar-chart PNG cut off half way"),
    "not_image": ("not-an-image.png", "a text file named .png"),
    "empty": ("empty.png", "a file of 0 bytes"),
}


def _draw_circle():
    Image, _ = _pil()
    from PIL import ImageDraw

    img = Image.new("RGB", (256, 256), "white")
    ImageDraw.Draw(img).ellipse((48, 48, 208, 208), fill=(220, 20, 20))
    return img


def _draw_chart():
    Image, _ = _pil()
    from PIL import ImageDraw

    img = Image.new("RGB", (512, 512), "white")
    d = ImageDraw.Draw(img)
    d.line((40, 470, 490, 470), fill="black", width=3)
    d.line((40, 30, 40, 470), fill="black", width=3)
    for i, v in enumerate((3, 7, 5, 2)):
        x = 70 + i * 105
        d.rectangle((x, 470 - v * 60, x + 70, 470), fill=(30, 80, 200))
    return img


def _draw_text():
    Image, _ = _pil()
    from PIL import ImageDraw, ImageFont

    img = Image.new("RGB", (800, 200), "white")
    try:
        font = ImageFont.load_default(size=64)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    ImageDraw.Draw(img).text((40, 60), "LMDeploy Lab 05", fill="black", font=font)
    return img


def _draw_large():
    import numpy as np

    Image, _ = _pil()
    w, h = 3840, 2160
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    sky = np.stack([120 + 80 * y + 0 * x, 170 + 60 * y + 0 * x, 235 - 20 * y + 0 * x], axis=-1)
    hills = (y > 0.62 + 0.08 * np.sin(6.0 * x)).astype(np.float32)[..., None]
    ground = np.stack([60 + 40 * y + 10 * np.sin(40 * x), 140 + 30 * y + 0 * x, 50 + 0 * y + 0 * x], axis=-1)
    sun = (((x - 0.75) * w) ** 2 + ((y - 0.25) * h) ** 2 < 220.0 ** 2).astype(np.float32)[..., None]
    img = sky * (1 - hills) + ground * hills
    img = img * (1 - sun) + np.array([255, 220, 60], dtype=np.float32) * sun
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def sample_images() -> dict[str, Path]:
    """The lab's pictures (written once under LABKIT_HOME/images): name -> path, bad inputs included."""
    folder = config.home() / "images" / f"v{IMAGES_VERSION}"
    paths = {k: folder / f for k, (f, _, _) in SAMPLES.items()} | {k: folder / f for k, (f, _) in BAD_SAMPLES.items()}
    if all(p.is_file() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    drawn = {"circle": _draw_circle(), "chart": _draw_chart(), "text": _draw_text(), "large": _draw_large()}
    for key, img in drawn.items():
        tmp = paths[key].with_suffix(".tmp")
        if paths[key].suffix == ".jpg":
            img.save(tmp, format="JPEG", quality=90)
        else:
            img.save(tmp, format="PNG")
        os.replace(tmp, paths[key])
    png = paths["chart"].read_bytes()
    paths["corrupt"].write_bytes(png[: len(png) // 2])
    paths["not_image"].write_text("This is a text file, not a picture.\n")
    paths["empty"].write_bytes(b"")
    return paths


def describe_samples():
    """A table of the sample images: file, size on disk, pixels, what they show."""
    import pandas as pd

    paths = sample_images()
    rows = [{"name": k, "file": paths[k].name, "pixels": f"{w}x{h}", "KiB": round(paths[k].stat().st_size / 1024, 1),
             "shows": about} for k, (_, (w, h), about) in SAMPLES.items()]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# generated:tiny-vl

TINY_VL = {
    "text": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=8192),
    # InternVL3's geometry (448 px tiles, 14 px patches, pixel shuffle 0.5 -> 256 tokens a tile), tiny widths
    "vision": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   image_size=448, patch_size=14),
}
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build_tiny_vl(out_dir: Path) -> None:
    """Write generated:tiny-vl (an HF-layout InternVL with seeded random bf16 weights) to `out_dir`."""
    import torch
    from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLProcessor, InternVLVideoProcessor, PreTrainedTokenizerFast)

    text, vision = TINY_VL["text"], TINY_VL["vision"]
    # The image tokens take the last 4 ids of the vocabulary.
    generate.train_tokenizer(text["vocab_size"] - len(IMAGE_TOKENS), out_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(out_dir, extra_special_tokens=IMAGE_TOKENS)
    assert len(tok) == text["vocab_size"], (len(tok), text["vocab_size"])
    # Image parts of a message become <IMG_CONTEXT>, as in OpenGVLab/InternVL3-1B-hf's template.
    template = generate.CHAT_TEMPLATE.replace("{{ '<IMAGE_TOKEN>' }}", "{{ '<IMG_CONTEXT>' + nl }}")
    assert template != generate.CHAT_TEMPLATE
    tok.chat_template = template
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<IMG_CONTEXT>")}
    cfg = InternVLConfig(
        text_config=dict(model_type="qwen2", rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], architectures=["Qwen2ForCausalLM"], **text),
        vision_config=dict(norm_type="layer_norm", use_mean_pooling=True, **vision),
        image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=256, downsample_ratio=0.5,
        tie_word_embeddings=False)
    cfg.architectures = ["InternVLForConditionalGeneration"]
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = InternVLForConditionalGeneration(cfg).to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(out_dir)
    tile = {"height": vision["image_size"], "width": vision["image_size"]}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=tile, crop_to_patches=True, min_patches=1, max_patches=12,
                                              image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
        video_processor=InternVLVideoProcessor(size=tile, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
        tokenizer=tok, image_seq_length=256, chat_template=template)
    processor.save_pretrained(out_dir)
    generate.template_in_tokenizer_config(out_dir, template)  # keeps the tokenizer_class the processor wrote
    generate.save_generation_config(out_dir, tok)
    del model


generate.register("tiny-vl", TINY_VL_VERSION, build_tiny_vl)
