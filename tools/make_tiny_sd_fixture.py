#!/usr/bin/env python3
"""Make a tiny random Stable Diffusion pipeline in the optimum ONNX layout, and diffusers' images for it.

Why: stage 3 must produce what diffusers' `StableDiffusionPipeline` produces for the same prompt embeddings
and initial latents. This script builds a tiny SD 1.x-shaped pipeline (random weights, seed 0), exports it the
way `optimum-cli export onnx` lays it out, and runs diffusers (PyTorch) on it to make the goldens.

- Tokenizer: the real CLIP BPE (`bpe_simple_vocab_16e6.txt.gz` from the PyPI wheel `open_clip_torch`, MIT),
  cut to its first 2000 merges so the files stay small; the vocabulary is built as OpenAI's tokenizer builds it
  (256 byte symbols, the same with `</w>`, the merges, then `<|startoftext|>`, `<|endoftext|>`), so ids are
  CLIP's own for everything the merges cover. Goldens from transformers' `CLIPTokenizer`.
- text_encoder: `transformers.CLIPTextModel` (hidden 32, 2 layers); `input_ids` int64 [batch, sequence] ->
  `last_hidden_state`, `pooler_output` (optimum >= 1.24 I/O).
- unet: `diffusers.UNet2DConditionModel` (blocks 16/24, cross-attention 32); `sample`, `timestep` (float32,
  rank 0, optimum >= 1.24), `encoder_hidden_states` -> `out_sample`.
- vae_decoder: `diffusers.AutoencoderKL` decoder (blocks 16/32: 2x upsampling); `latent_sample` -> `sample`.
- scheduler/scheduler_config.json: SD 1.x's PNDM config. Latents 4x8x8, images 16x16.

Goldens (tests/fixtures/tiny_sd/goldens.json): tokenizer ids for several prompts; for PNDM and DDIM at batch 1
and batch 3, 8 steps, guidance 7.5: the class anchor tokens, the outlier vectors v, the initial latents, and
diffusers' images (output_type "np", then round(255 x) as diffusers' numpy_to_pil does). The prompt
embeddings are built by the official Dream-OOD method: overwrite the anchor token's row of the token table
with v, encode the padded prompt, restore the row; the negative prompt is "".

Run: make fixtures-venv && .deps/venv/bin/python tools/make_tiny_sd_fixture.py
Tolerance used by the tests: 2/255 per pixel.
"""

import glob
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import diffusers
import numpy as np
import onnx
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tiny_sd"
MODEL = OUT / "model"
NUM_MERGES = 2000
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(dest: Path) -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "open_clip_torch==3.3.0", "-d", tmp],
                       check=True)
        wheel = glob.glob(f"{tmp}/open_clip_torch-*.whl")[0]
        raw = zipfile.ZipFile(wheel).read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]
    symbols = bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (dest / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (dest / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77,
                                                             "tokenizer_class": "CLIPTokenizer"}, indent=2))
    return CLIPTokenizer(str(dest / "vocab.json"), str(dest / "merges.txt"), pad_token="<|endoftext|>")


class UNetWrapper(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class DecoderWrapper(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class TextWrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids)
        return out.last_hidden_state, out.pooler_output


def export(module, args, path: Path, inputs, outputs, axes):
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def encode_with_row(text_encoder, tokenizer, prompts, anchors, vectors):
    """The official injection: overwrite the anchor's row, encode, restore (one prompt at a time)."""
    table = text_encoder.get_input_embeddings().weight
    outs = []
    for prompt, anchor, v in zip(prompts, anchors, vectors):
        ids = tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            saved = table[anchor].clone()
            if v is not None:
                table[anchor] = torch.tensor(v)
            outs.append(text_encoder(input_ids=ids).last_hidden_state)
            table[anchor] = saved
    return torch.cat(outs)


def main() -> None:
    torch.manual_seed(0)
    if MODEL.exists():
        shutil.rmtree(MODEL)
    tokenizer = write_tokenizer(MODEL / "tokenizer")
    vocab_size = len(tokenizer.get_vocab())

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 24),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
        norm_num_groups=8, sample_size=16, scaling_factor=0.18215).eval()
    scheduler = PNDMScheduler(**SD_SCHEDULER)

    export(TextWrapper(text_encoder), (torch.zeros(1, 77, dtype=torch.int64),), MODEL / "text_encoder" / "model.onnx",
           ["input_ids"], ["last_hidden_state", "pooler_output"],
           {"input_ids": {0: "batch_size", 1: "sequence_length"}, "last_hidden_state": {0: "batch_size"},
            "pooler_output": {0: "batch_size"}})
    text_encoder.config.save_pretrained(MODEL / "text_encoder")
    export(UNetWrapper(unet), (torch.randn(2, 4, 8, 8), torch.tensor(981.0), torch.randn(2, 77, 32)),
           MODEL / "unet" / "model.onnx", ["sample", "timestep", "encoder_hidden_states"], ["out_sample"],
           {"sample": {0: "batch_size", 2: "height", 3: "width"}, "encoder_hidden_states": {0: "batch_size"},
            "out_sample": {0: "batch_size", 2: "height", 3: "width"}})
    unet.save_config(MODEL / "unet")
    export(DecoderWrapper(vae), (torch.randn(1, 4, 8, 8),), MODEL / "vae_decoder" / "model.onnx", ["latent_sample"],
           ["sample"], {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
                        "sample": {0: "batch_size", 2: "height", 3: "width"}})
    vae.save_config(MODEL / "vae_decoder")
    scheduler.save_pretrained(MODEL / "scheduler")
    (MODEL / "model_index.json").write_text(json.dumps({
        "_class_name": "ORTStableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae_decoder": ["diffusers", "AutoencoderKL"]}, indent=2))

    # Tokenizer goldens.
    texts = ["", "A high-quality image of the airplane", "a photo of a cat", "  Spaces   and\tTabs ",
             "digits 12345 and punctuation!?", "it's the dog's toy", "lawn-mower", " ".join(["dog"] * 90)]
    token_goldens = [{"text": t, "ids": tokenizer(t, padding="max_length", max_length=77, truncation=True).input_ids}
                     for t in texts]

    # Pipeline goldens.
    classes = [("airplane", "airplane"), ("cat", "cat"), ("lawn-mower", "mower")]
    rng = np.random.default_rng(0)
    cases = []
    for sched_name, sched in [("pndm", PNDMScheduler(**SD_SCHEDULER)), ("ddim", DDIMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "skip_prk_steps"},
                                                         clip_sample=False))]:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        for batch in [1, 3]:
            picked = [classes[i % 3] for i in range(batch)]
            prompts = [f"A high-quality image of the {name}" for name, _ in picked]
            anchors = [tokenizer(word).input_ids[1] for _, word in picked]
            vectors = [(rng.standard_normal(32) * 0.4).astype(np.float32) for _ in range(batch)]
            cond = encode_with_row(text_encoder, tokenizer, prompts, anchors, vectors)
            uncond = encode_with_row(text_encoder, tokenizer, [""] * batch, anchors, [None] * batch)
            latents = torch.tensor(rng.standard_normal((batch, 4, 8, 8)).astype(np.float32))
            with torch.no_grad():
                images = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents.clone(),
                              num_inference_steps=8, guidance_scale=7.5, output_type="np").images
            cases.append({
                "scheduler": sched_name, "batch": batch, "steps": 8, "guidance": 7.5, "prompts": prompts,
                "embedding_words": [w for _, w in picked], "anchors": anchors,
                "vectors": [v.tolist() for v in vectors], "latents": latents.flatten().tolist(),
                "image_shape": list(images.shape),
                "images_u8": np.round(images * 255).astype(np.uint8).flatten().tolist(),
                "images_float": images.flatten().tolist(),
            })
    goldens = {"tokenizer": token_goldens, "pipelines": cases, "made_by":
               f"tools/make_tiny_sd_fixture.py with diffusers {diffusers.__version__}, transformers "
               f"{transformers.__version__}, torch {torch.__version__}"}
    (OUT / "goldens.json").write_text(json.dumps(goldens) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
