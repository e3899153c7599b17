#!/usr/bin/env python3
"""Export Stable Diffusion 1.4, 1.5 or 2.1-base to the ONNX folder `dream-ood generate --model` reads, and check it.

Why: stage 3 runs untouched `optimum-cli export onnx` folders. This script runs that exporter on a diffusers
repository from the Hugging Face Hub, then checks that the folder holds everything dream-ood loads, so a
broken or partial export fails here, with a list of what is missing, rather than at the start of a long job.

It is a user tool: it downloads several GB and nothing in the build or the tests runs it. It needs the
`optimum-cli` command of the PyPI package `optimum-onnx` (and `onnx`, which that package installs, for the
checks of external data and input names); `--fp16` also needs a CUDA GPU with a CUDA build of torch, since
optimum exports fp16 only on the GPU (`--device cuda --dtype fp16`).

    tools/export_sd.py sd15 exports/sd15                  # fp32, on the CPU
    tools/export_sd.py sd21 exports/sd21-fp16 --fp16      # fp16, on a CUDA GPU
    tools/export_sd.py --check exports/sd15               # only check an existing export

MODEL is sd14 (CompVis/stable-diffusion-v1-4), sd15 (stable-diffusion-v1-5/stable-diffusion-v1-5, the
mirror of runwayml/stable-diffusion-v1-5), sd21 (stabilityai/stable-diffusion-2-1-base), or any diffusers
repository id or local diffusers folder. Exit status: 0 exported and checked; 1 the check failed; 2 bad
arguments or the exporter failed.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

MODELS = {
    "sd14": "CompVis/stable-diffusion-v1-4",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1-base",
}

# What dream-ood reads (src/diffusion/model_dir.rs, tokenizer.rs, schedulers/), relative to the export.
REQUIRED_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "text_encoder/model.onnx",
    "unet/model.onnx",
    "vae_decoder/model.onnx",
]

# Inputs and outputs each model must declare: the names dream-ood feeds and reads (src/diffusion/{text_encoder,
# unet,vae}.rs); every exporter in use writes them (optimum, diffusers' conversion script).
REQUIRED_IO = {
    "text_encoder/model.onnx": (["input_ids"], ["last_hidden_state"]),
    "unet/model.onnx": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
    "vae_decoder/model.onnx": (["latent_sample"], ["sample"]),
}


def export(repo: str, out: Path, fp16: bool) -> None:
    """Runs optimum's exporter; exits with status 2 when it cannot run or fails."""
    cli = shutil.which("optimum-cli")
    if cli is None:
        fail("optimum-cli not found; install the PyPI package optimum-onnx (pip install optimum-onnx)")
    if out.exists() and any(out.iterdir()):
        fail(f"{out} exists and is not empty; give a new folder (or --check it)")
    cmd = [cli, "export", "onnx", "--model", repo, "--task", "text-to-image"]
    if fp16:
        cmd += ["--device", "cuda", "--dtype", "fp16"]
    cmd.append(str(out))
    print("running:", " ".join(cmd), file=sys.stderr)
    result = subprocess.run(cmd)
    if result.returncode != 0:
        fail(f"optimum-cli exited with status {result.returncode}")


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_onnx(path: Path, inputs: list, outputs: list) -> list:
    """Problems with one model: external data files missing or short, required inputs or outputs absent."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    # Weights stay on disk: only the graph and the external-data pointers are read.
    model = onnx.load(str(path), load_external_data=False)
    problems = []
    needed = {}  # external file -> bytes it must hold
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        location = info.get("location", "")
        needed[location] = max(needed.get(location, 0), end)
    for location, end in sorted(needed.items()):
        data = path.parent / location
        if not data.is_file():
            problems.append(f"{path.parent.name}/{location}: missing (external data of {path.name})")
        elif data.stat().st_size < end:
            problems.append(
                f"{path.parent.name}/{location}: {data.stat().st_size} bytes, its tensors need {end} (cut short?)"
            )
    declared_in = [i.name for i in model.graph.input]
    declared_out = [o.name for o in model.graph.output]
    for name in inputs:
        if name not in declared_in:
            problems.append(f"{path.parent.name}/{path.name}: no input `{name}` (inputs: {declared_in})")
    for name in outputs:
        if name not in declared_out:
            problems.append(f"{path.parent.name}/{path.name}: no output `{name}` (outputs: {declared_out})")
    return problems


def check(out: Path) -> bool:
    """Checks an export folder; prints what is wrong, or a summary and the dream-ood command."""
    problems = [f"{rel}: missing" for rel in REQUIRED_FILES if not (out / rel).is_file()]
    for rel in ["model_index.json", "scheduler/scheduler_config.json"]:
        if (out / rel).is_file():
            try:
                json.loads((out / rel).read_text())
            except ValueError as e:
                problems.append(f"{rel}: not JSON ({e})")
    try:
        import onnx  # noqa: F401

        have_onnx = True
    except ImportError:
        have_onnx = False
        print("warning: the onnx package is missing: external data and input names not checked", file=sys.stderr)
    if have_onnx:
        for rel, (inputs, outputs) in REQUIRED_IO.items():
            if (out / rel).is_file():
                problems += check_onnx(out / rel, inputs, outputs)
    if problems:
        print(f"{out}: not a complete Stable Diffusion export for dream-ood:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return False
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: complete ({total / 1e9:.2f} GB on disk)", file=sys.stderr)
    print(f"dream-ood generate --model {out} --embeddings OUTLIERS.npy --classes CLASSES.toml --out IMAGES/ ...")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Export SD 1.4 / 1.5 / 2.1-base with optimum-cli and check the folder for dream-ood.",
        epilog="MODEL: " + ", ".join(f"{k} = {v}" for k, v in MODELS.items()) + ", or a diffusers repo id or folder.",
    )
    parser.add_argument("model", nargs="?", help="sd14, sd15, sd21, or a diffusers repository id / folder")
    parser.add_argument("out", type=Path, help="the export folder to write (or to check, with --check)")
    parser.add_argument("--fp16", action="store_true", help="export fp16 on a CUDA GPU (--device cuda --dtype fp16)")
    parser.add_argument("--check", action="store_true", help="only check an existing export folder")
    args = parser.parse_args()
    if args.check:
        if args.model is not None or args.fp16:
            parser.error("--check takes only the export folder")
    else:
        if args.model is None:
            parser.error("give MODEL and OUT (or --check OUT)")
        export(MODELS.get(args.model, args.model), args.out, args.fp16)
    sys.exit(0 if check(args.out) else 1)


if __name__ == "__main__":
    main()
