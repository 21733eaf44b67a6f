"""generated:tiny-vl (lab 05): a random-weight InternVL in transformers' own layout
(`InternVLForConditionalGeneration`, no remote code), which lmdeploy 0.18's engines and its InternVL
preprocessor load as they load OpenGVLab/InternVL3-1B-hf. Its text tower is tiny-chat's Qwen2 shape; its
tiles, patches and image tokens have InternVL3's real geometry, and its vision heads are 64 wide, a width
TurboMind's own InternViT runs (`turbomind_vision_problem` says which models it cannot run).

No transformers-5 fix is applied, because this path needs none: lmdeploy 0.18's InternVL preprocessor calls
the transformers processor the way transformers 5 expects (tests/test_vision.py runs it). The failure the GPU
runner README describes (torchvision CLIP processor + `input_data_format='channels_last'`) is in lmdeploy's
llava-hf preprocessor only.
"""
from __future__ import annotations

from pathlib import Path

from labkit import generate

TINY_VL_VERSION = 2      # bump when the files of generated:tiny-vl change (2: vision head_dim 16 -> 64)

TINY_VL = {
    "text": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=8192),
    # InternVL3's geometry (448 px tiles, 14 px patches, pixel shuffle 0.5 -> 256 tokens a tile), tiny widths
    # 2 heads of 64 (InternViT-300M's head width): TurboMind's own InternViT takes 64 or 128, not 16
    "vision": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
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
