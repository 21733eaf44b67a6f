"""Images in (lab 05): `load` reads a path, a URL, bytes or a PIL image with one clear error (`ImageError`)
for a missing file, a URL that does not answer, a file that is not an image, a corrupt or truncated file, or a
0x0 image; resizing, OpenAI content parts, and the lab's sample pictures (drawn by code, under LABKIT_HOME).
"""
from __future__ import annotations

import base64
import contextlib
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit import config
from labkit.errors import LabkitError

if TYPE_CHECKING:
    from PIL.Image import Image

IMAGES_VERSION = 1       # bump when sample_images() draws something else
URL_TIMEOUT = 5.0        # seconds a URL gets to answer


class ImageError(LabkitError, ValueError):
    """An image could not be read or used; the message says what to do next."""

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


def _scaled(size: tuple[int, int], n: int) -> tuple[int, int]:
    w, h = size
    if max(w, h) <= n:
        return w, h
    s = n / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))



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


def load_or_none(src: Any, timeout: float = URL_TIMEOUT) -> "Image | None":
    """load(src), or None after printing why it could not be read (for optional pictures, e.g. from the web)."""
    try:
        return load(src, timeout=timeout)
    except ImageError as err:
        print(f"no image: {err}")
        return None
