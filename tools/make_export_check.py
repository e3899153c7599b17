#!/usr/bin/env python3
"""Checks a detector exported by `dream-ood export` with the ONNX reference tools, and records what they
say for the Rust test `tests/deploy.rs::export_matches_the_python_reference`.

Why: an exported detector must be a valid ONNX model that *any* ONNX Runtime runs the same way, and its
threshold must be what the documented rule gives on the scores Python computes. So this script, from outside
dream-ood:

1. writes a small deterministic checkpoint with PyTorch (ResNet-18, CIFAR stem, 4 classes; the networks of
   `tools/make_resnet_fixtures.py`; weights by `fill` below, the formula `tests/deploy.rs` uses too) as
   safetensors with dream-ood's `dream_ood` metadata;
2. writes 24 calibration PNGs and 2 test PNGs from a pixel formula (committed beside the fixture);
3. runs `dream-ood export --preprocess --score energy --temperature 1.5 --tpr 0.9 --calibration ...`;
4. runs `onnx.checker.check_model(model, full_check=True)` (raises on any problem);
5. runs Python onnxruntime on the test images (decoded by Pillow, uint8 NHWC) and PyTorch eager on the
   same images through torchvision's ToTensor + Normalize, and checks they agree (1e-4);
6. recomputes the threshold from Python onnxruntime's scores of the calibration images with numpy (largest
   t with mean(scores >= t) >= 0.9) and checks the exported threshold equals it exactly.

Writes tests/fixtures/deploy/export_check.json (versions, checker verdict, metadata, outputs) and the PNGs in
tests/fixtures/deploy/{calibration,test}/.

Run: make fixtures-venv && cargo build && .deps/venv/bin/python tools/make_export_check.py
Tolerances used by the Rust test: 1e-5 on Python ORT's outputs (same graph, same runtime version),
1e-4 on PyTorch eager's and on the threshold (the Rust test rebuilds the checkpoint with libtorch).
"""

import argparse
import hashlib
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "deploy"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_resnet_fixtures import Classifier  # noqa: E402

CLASSES = ["apple", "bee, honey", "castle", "\"dolphin\""]
MEAN = [125.3 / 255, 123.0 / 255, 113.9 / 255]
STD = [63.0 / 255, 62.1 / 255, 66.7 / 255]
TPR = 0.9
TEMPERATURE = 1.5


def fill(name: str, shape) -> torch.Tensor:
    """The formula weights of `tests/deploy.rs` (`fill`), with the same torch ops in f64."""
    n = math.prod(shape)
    phase = sum(name.encode()) * 0.01
    t = torch.arange(n, dtype=torch.float64) * 0.6180339887498949 + phase
    u = (t - t.floor()) * 2.0 - 1.0
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "weight" and len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        a = 0.7 if ("layer" in name and ".conv" in name) else 1.0
        v = u * (a * math.sqrt(3.0 / fan_in))
    elif leaf == "weight":
        v = u * 0.1 + 1.0
    elif leaf in ("bias", "running_mean"):
        v = u * 0.1
    elif leaf == "running_var":
        v = u * 0.25 + 1.0
    else:
        raise ValueError(name)
    return v.to(torch.float32).reshape(shape)


def pixels(seed: int, w: int = 32, h: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    chans = [((x * (7 + seed) + y * (13 + 3 * c) + seed * 31 + c * 77) % 256) for c in range(3)]
    return np.stack(chans, axis=-1).astype(np.uint8)


def checkpoint(path: Path) -> Classifier:
    model = Classifier("resnet18", "cifar", num_classes=len(CLASSES))
    state = {}
    for k, v in model.state_dict().items():
        state[k] = torch.zeros((), dtype=torch.int64) if k.endswith("num_batches_tracked") else fill(k, tuple(v.shape))
    model.load_state_dict(state)
    info = {
        "format_version": 1,
        "stage": "detector",
        "network": {"depth": "resnet18", "stem": "cifar", "in_channels": 3, "head": "fc", "out_dim": len(CLASSES)},
        "classes": CLASSES,
        "eval_transform": {"channels": 3, "transforms": [], "normalize": {"mean": MEAN, "std": STD}},
        "epoch": 0,
        "extra": {"config_sha256": "5" * 64},
        "writer": "tools/make_export_check.py",
    }
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"dream_ood": json.dumps(info)})
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target" / "debug" / "dream-ood"))
    args = ap.parse_args()

    cal_dir, test_dir = OUT / "calibration", OUT / "test"
    for d in (cal_dir, test_dir):
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.png"):
            old.unlink()
    for i in range(24):
        Image.fromarray(pixels(i)).save(cal_dir / f"{i:02d}.png")
    tests = [test_dir / "a.png", test_dir / "b.png"]
    Image.fromarray(pixels(101)).save(tests[0])
    Image.fromarray(pixels(202)).save(tests[1])

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, onnx_path = Path(tmp) / "det.safetensors", Path(tmp) / "det.onnx"
        model = checkpoint(ckpt)
        cmd = [args.bin, "-q", "export", "--checkpoint", str(ckpt), "--out", str(onnx_path), "--preprocess",
               "--score", "energy", "--temperature", str(TEMPERATURE), "--tpr", str(TPR),
               "--calibration", str(cal_dir)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

        m = onnx.load(str(onnx_path))
        onnx.checker.check_model(m, full_check=True)
        meta = {p.key: p.value for p in m.metadata_props}
        opset = [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")][0]

        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        assert sess.get_modelmeta().custom_metadata_map == meta
        batch = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in tests])  # [2, 32, 32, 3] uint8
        logits, score, is_ood = sess.run(["logits", "score", "is_ood"], {"image": batch})

        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
        x = torch.stack([tf(Image.open(p).convert("RGB")) for p in tests])
        with torch.no_grad():
            _, t_logits = model(x)
        t_energy = TEMPERATURE * torch.logsumexp(t_logits / TEMPERATURE, dim=1)
        assert np.abs(logits - t_logits.numpy()).max() < 1e-4, "ORT and PyTorch eager disagree"
        assert np.abs(score - t_energy.numpy()).max() < 1e-4

        cal_files = sorted(cal_dir.glob("*.png"))
        cal = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in cal_files])
        cal_scores = sess.run(["score"], {"image": cal})[0].astype(np.float32)
        s = np.sort(cal_scores)
        n = len(s)
        k = max(k for k in range(n) if (n - k) / n >= TPR)
        assert np.float32(meta["threshold"]) == s[k], (meta["threshold"], s[k])
        assert float(meta["calibration.achieved_tpr"]) == float(np.mean(cal_scores >= s[k]))
        set_hash = hashlib.sha256("".join(sorted(hashlib.sha256(p.read_bytes()).hexdigest() + "\n"
                                                 for p in cal_files)).encode()).hexdigest()
        assert meta["calibration.sha256"] == set_hash

    fixture = {
        "made_by": "tools/make_export_check.py",
        "versions": {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__},
        "command": "dream-ood export --checkpoint CKPT --out det.onnx --preprocess --score energy "
                   f"--temperature {TEMPERATURE} --tpr {TPR} --calibration tests/fixtures/deploy/calibration",
        "checker": "passed (onnx.checker.check_model, full_check=True)",
        "opset": opset,
        "ir_version": m.ir_version,
        "metadata": meta,
        "test_images": [p.name for p in tests],
        "ort_logits": logits.tolist(),
        "ort_score": score.tolist(),
        "ort_is_ood": is_ood.tolist(),
        "torch_logits": t_logits.numpy().tolist(),
        "torch_energy": t_energy.numpy().tolist(),
        "calibration_scores": cal_scores.tolist(),
        "threshold_numpy": float(s[k]),
    }
    path = OUT / "export_check.json"
    path.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {path}: checker passed, ORT = PyTorch eager, threshold {s[k]} = numpy's rule")


if __name__ == "__main__":
    main()
