#!/usr/bin/env python3
"""Benchmark of stage 3: `dream-ood generate` against the Python pipelines, same model, steps, batch and cores.

The model: a mid-size random Stable Diffusion in the optimum ONNX layout (UNet 35 M parameters, blocks
128/256/256 with cross-attention 256; text encoder hidden 256, 4 layers, the tiny-fixture tokenizer; VAE with a
4x factor; 32x32 latents, 128x128 images), made once into .deps/bench/sd-mid/ with the exporter of
tools/make_tiny_sd_fixture.py. Random weights cost exactly what trained ones cost.

Contenders (each in its own process, timed end to end from start to exit, peak RSS from wait4):
  - dream-ood generate (release binary): --workers auto, and --workers 1 (one session with all cores);
  - python-ort: onnxruntime sessions driven by diffusers' PNDMScheduler, as optimum's ORT pipeline does
    (intra-op threads = cores, text encoder run per batch, numpy/torch glue);
  - diffusers-torch: diffusers' StableDiffusionPipeline on PyTorch, torch.set_num_threads(cores).
Settings: 16 images (8 classes x 2), batch 2, 10 PNDM steps, guidance 7.5.

Run: make bench (needs `make fixtures-venv`); prints a Markdown table and writes .deps/bench/results.json.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".deps" / "bench"
MODEL = BENCH / "sd-mid"
IMAGES, BATCH, STEPS, GUIDANCE, CLASSES = 16, 2, 10, 7.5, 8
CORES = os.cpu_count() or 1


def make_model() -> None:
    if (MODEL / "model_index.json").exists():
        return
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT / "tools"))
    import make_tiny_sd_fixture as tiny

    torch.manual_seed(0)
    tokenizer = tiny.write_tokenizer(MODEL / "tokenizer")
    vocab = len(tokenizer.get_vocab())
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)).eval()
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(128, 256, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=256,
        attention_head_dim=8, norm_num_groups=32).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), latent_channels=4,
                        norm_num_groups=32, scaling_factor=0.18215).eval()
    tiny.export(tiny.TextWrapper(text), (torch.zeros(1, 77, dtype=torch.int64),), MODEL / "text_encoder" / "model.onnx",
                ["input_ids"], ["last_hidden_state", "pooler_output"],
                {"input_ids": {0: "batch_size"}, "last_hidden_state": {0: "batch_size"}, "pooler_output": {0: "batch_size"}})
    tiny.export(tiny.UNetWrapper(unet), (torch.randn(2, 4, 32, 32), torch.tensor(981.0), torch.randn(2, 77, 256)),
                MODEL / "unet" / "model.onnx", ["sample", "timestep", "encoder_hidden_states"], ["out_sample"],
                {"sample": {0: "batch_size"}, "encoder_hidden_states": {0: "batch_size"}, "out_sample": {0: "batch_size"}})
    tiny.export(tiny.DecoderWrapper(vae), (torch.randn(1, 4, 32, 32),), MODEL / "vae_decoder" / "model.onnx",
                ["latent_sample"], ["sample"], {"latent_sample": {0: "batch_size"}, "sample": {0: "batch_size"}})
    vae.save_config(MODEL / "vae_decoder")
    PNDMScheduler(**tiny.SD_SCHEDULER).save_pretrained(MODEL / "scheduler")
    # The PyTorch modules for the diffusers contender.
    text.save_pretrained(MODEL / "torch" / "text_encoder")
    unet.save_pretrained(MODEL / "torch" / "unet")
    vae.save_pretrained(MODEL / "torch" / "vae")
    (MODEL / "model_index.json").write_text(json.dumps({"_class_name": "ORTStableDiffusionPipeline"}))


def inputs() -> None:
    import numpy as np

    words = ["airplane", "cat", "dog", "ship", "truck", "bird", "horse", "frog"][:CLASSES]
    (BENCH / "classes.toml").write_text("".join(f'[[class]]\nname = "{w}"\n\n' for w in words))
    rng = np.random.default_rng(0)
    np.save(BENCH / "outliers.npy", (rng.standard_normal((CLASSES, 4, 256)) * 0.4).astype(np.float32))


def timed(cmd: list[str], env=None) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    if status != 0:
        raise SystemExit(f"{cmd[0]} failed ({status}):\n{err}")
    return {"seconds": wall, "images_per_second": IMAGES / wall, "peak_rss_mib": usage.ru_maxrss / 1024, "log": err[-2000:]}


def python_ort() -> None:
    """The optimum-style pipeline: onnxruntime sessions + diffusers' scheduler."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from diffusers import PNDMScheduler
    from transformers import CLIPTokenizer

    torch.set_num_threads(1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = CORES
    sess = {k: ort.InferenceSession(str(MODEL / k / "model.onnx"), opts, providers=["CPUExecutionProvider"])
            for k in ["text_encoder", "unet", "vae_decoder"]}
    tok = CLIPTokenizer(str(MODEL / "tokenizer" / "vocab.json"), str(MODEL / "tokenizer" / "merges.txt"),
                        pad_token="<|endoftext|>")
    words = [line.split('"')[1] for line in (BENCH / "classes.toml").read_text().splitlines() if line.startswith("name")]
    rng = np.random.default_rng(0)
    for b in range(IMAGES // BATCH):
        prompts = [f"A high-quality image of the {words[(b * BATCH + i) % len(words)]}" for i in range(BATCH)]
        ids = tok(prompts + [""] * BATCH, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
        emb = sess["text_encoder"].run(["last_hidden_state"], {"input_ids": ids.astype(np.int64)})[0]
        context = np.concatenate([emb[BATCH:], emb[:BATCH]])
        scheduler = PNDMScheduler.from_pretrained(MODEL / "scheduler")
        scheduler.set_timesteps(STEPS)
        latents = rng.standard_normal((BATCH, 4, 32, 32)).astype(np.float32) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = np.concatenate([latents] * 2)
            x = scheduler.scale_model_input(torch.from_numpy(x), t).numpy()
            out = sess["unet"].run(["out_sample"], {"sample": x, "timestep": np.array(float(t), dtype=np.float32),
                                                    "encoder_hidden_states": context})[0]
            eps_u, eps_c = out[:BATCH], out[BATCH:]
            eps = eps_u + GUIDANCE * (eps_c - eps_u)
            latents = scheduler.step(torch.from_numpy(eps), t, torch.from_numpy(latents)).prev_sample.numpy()
        images = sess["vae_decoder"].run(["sample"], {"latent_sample": latents / 0.18215})[0]
        (np.clip(images / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)


def diffusers_torch() -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(CORES)
    tok = CLIPTokenizer(str(MODEL / "tokenizer" / "vocab.json"), str(MODEL / "tokenizer" / "merges.txt"),
                        pad_token="<|endoftext|>", model_max_length=77)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(MODEL / "torch" / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(MODEL / "torch" / "text_encoder"), tokenizer=tok,
        unet=UNet2DConditionModel.from_pretrained(MODEL / "torch" / "unet"),
        scheduler=PNDMScheduler.from_pretrained(MODEL / "scheduler"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    words = [line.split('"')[1] for line in (BENCH / "classes.toml").read_text().splitlines() if line.startswith("name")]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in range(IMAGES // BATCH):
            prompts = [f"A high-quality image of the {words[(b * BATCH + i) % len(words)]}" for i in range(BATCH)]
            pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=128, width=128, generator=gen,
                 output_type="np")


def main() -> None:
    if len(sys.argv) > 1:  # a contender, run in its own process
        {"python-ort": python_ort, "diffusers-torch": diffusers_torch}[sys.argv[1]]()
        return
    BENCH.mkdir(parents=True, exist_ok=True)
    make_model()
    inputs()
    binary = ROOT / "target" / "release" / "dream-ood"
    results = {}
    for name, workers in [("dream-ood generate --workers auto", "0"), ("dream-ood generate --workers 1", "1")]:
        out = BENCH / f"out-{workers}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        results[name] = timed([str(binary), "generate", "--model", str(MODEL), "--embeddings", str(BENCH / "outliers.npy"),
                               "--classes", str(BENCH / "classes.toml"), "--out", str(out), "--total", str(IMAGES),
                               "--batch", str(BATCH), "--steps", str(STEPS), "--guidance", str(GUIDANCE),
                               "--image-size", "128", "--workers", workers])
    for name in ["python-ort", "diffusers-torch"]:
        results[name] = timed([sys.executable, __file__, name])
    best_python = max(results["python-ort"]["images_per_second"], results["diffusers-torch"]["images_per_second"])
    print(f"| contender ({IMAGES} images, batch {BATCH}, {STEPS} PNDM steps, {CORES} cores) | images/s | "
          f"vs faster Python | wall s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['images_per_second']:.3f} | {r['images_per_second'] / best_python:.2f}x | "
              f"{r['seconds']:.1f} | {r['peak_rss_mib']:.0f} |")
    (BENCH / "results.json").write_text(json.dumps(results, indent=2))
    for line in results["dream-ood generate --workers auto"]["log"].splitlines():
        if "worker layout" in line or "generate done" in line:
            print(line)


if __name__ == "__main__":
    main()
