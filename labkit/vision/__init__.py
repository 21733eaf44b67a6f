"""Vision-language work for lab 05, in four parts (all names importable from `labkit.vision`):

- `images`: `load(src)` reads a path, a URL, bytes or a PIL image with one clear error (`ImageError`);
  resizing, OpenAI content parts, and the lab's sample pictures (`sample_images()`).
- `tokens`: `token_cost(model_dir, image)` predicts the image tokens lmdeploy 0.18 spends BEFORE it runs
  (mirroring its InternVL preprocessors); `fits`, `require_fit`, `fit_image`, `cost_table`.
- `engines`: what engines do with images: `turbomind_vision_problem` (vision heads TurboMind cannot run),
  `is_context_refusal` (the over-long prompt, either engine), `check_prediction` (predicted vs counted
  tokens), `within` (a deadline for a request).
- `memory`: weights by part from the safetensors headers, and the lab's memory table.
- `tiny_vl`: `generated:tiny-vl`, a random-weight InternVL in transformers' layout (registered on import).
Used by lab 05 and by labkit.webui's image upload.
"""
from __future__ import annotations

from labkit.vision import tiny_vl as _tiny_vl  # noqa: F401  (registers generated:tiny-vl)
from labkit.vision.engines import (CONTEXT_CODE, REQUEST_TIMEOUT_S, TURBOMIND_VIT_HEAD_DIMS, RequestTimeout,
                                   check_prediction, is_context_refusal, server_chat, turbomind_vision_problem,
                                   vision_head_dim, within)
from labkit.vision.images import (BAD_SAMPLES, IMAGES_VERSION, SAMPLES, URL_TIMEOUT, ImageError, data_url,
                                  describe_samples, image_part, load, load_or_none, resize_longest, sample_images, show,
                                  user_message)
from labkit.vision.memory import PARTS, memory_table, weights_by_part
from labkit.vision.tiny_vl import IMAGE_TOKENS, TINY_VL, TINY_VL_VERSION, build_tiny_vl
from labkit.vision.tokens import (DEFAULT_PROMPT_TOKENS, IMAGE_WRAP_TOKENS, INTERNVL_ARCHS, LEGACY_INTERNVL_ARCHS, Fit,
                                  ImageTooLargeError, VisionSpec, cost_table, fit_image, fits, is_vision_model,
                                  require_fit, text_tokens, tile_grid, tiles, token_cost, vision_spec)

__all__ = [n for n in dir() if not n.startswith("_")]
