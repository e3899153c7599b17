#!/usr/bin/env python3
"""Golden outputs of PyTorch's bilinear resize for `dream_ood::diffusion::pipeline::resize_bilinear`.

Why: the official Dream-OOD script resizes its 512x512 images to 256x256 with
`F.interpolate(mode="bilinear")` (align_corners=False, no antialias) before truncating to 8 bits (SPEC §3.1
step 8); `dream-ood generate --resize` must do the same. Input: numpy default_rng(0) uniform [1, 3, 16, 16];
outputs for sizes 8 (exact 2x reduction), 6, 11 and 20, from torch.nn.functional.interpolate.

Writes tests/fixtures/resize/bilinear.json.
Run: make fixtures-venv && .deps/venv/bin/python tools/make_resize_fixture.py
Tolerance used by the test: 1e-6 absolute.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "resize"


def main() -> None:
    x = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32)
    cases = {}
    for size in [8, 6, 11, 20]:
        y = F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False)
        cases[str(size)] = y.flatten().tolist()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bilinear.json").write_text(json.dumps({"input": x.flatten().tolist(), "shape": list(x.shape),
                                                   "outputs": cases, "made_by": f"torch {torch.__version__}"}) + "\n")


if __name__ == "__main__":
    main()
