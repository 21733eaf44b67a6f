"""Token cost (lab 05): how many image tokens lmdeploy 0.18 spends on an image BEFORE it runs, by mirroring its
InternVL preprocessors (`lmdeploy/vl/model/internvl3_hf.py`, `internvl.py`): the image is cut into 448x448 tiles
on the grid whose aspect ratio is closest to the image's (up to 12 tiles, plus a thumbnail), 256 tokens a tile.
`fits`, `require_fit` and `fit_image` turn that into a yes/no before any GPU work; `check_prediction` compares
the prediction with what an engine reported, image by image.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from labkit.vision.images import ImageError, _scaled, load, resize_longest

if TYPE_CHECKING:
    from PIL.Image import Image

IMAGE_WRAP_TOKENS = 3    # InternVL writes each image as <img>...</img> plus a newline
DEFAULT_PROMPT_TOKENS = 64  # a short question plus the chat template around it
INTERNVL_ARCHS = ("InternVLForConditionalGeneration", "InternS1ForConditionalGeneration")
LEGACY_INTERNVL_ARCHS = ("InternVLChatModel",)


class ImageTooLargeError(ImageError):
    """An image needs more tokens than the session leaves, even after resizing."""

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


def text_tokens(model_dir: str | Path, question: str) -> int:
    """Tokens of a one-image prompt besides the image: the chat template around `question` + the image's wrapping."""
    import contextlib
    import io

    from lmdeploy.model import get_chat_template
    from lmdeploy.tokenizer import Tokenizer

    with contextlib.redirect_stderr(io.StringIO()):
        prompt = get_chat_template(str(model_dir)).messages2prompt([{"role": "user", "content": question}])
        return len(Tokenizer(str(model_dir)).encode(prompt)) + IMAGE_WRAP_TOKENS
