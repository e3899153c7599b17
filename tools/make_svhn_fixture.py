#!/usr/bin/env python3
"""Small SVHN-shaped MATLAB files and what torchvision decodes from them, for `dream_ood::data::svhn_mat`.

Why: SVHN (an OOD test set of the paper's CIFAR-100 benchmark, SPEC §5.3) ships as MATLAB level-5 files
(`test_32x32.mat`: `X` uint8 [32, 32, 3, N] column-major, `y` double [N, 1] with 10 for the digit 0), and
the official code reads them with `torchvision.datasets.SVHN`, i.e. `scipy.io.loadmat`. The Rust reader
must give the same pixels and labels, so the files are written by `scipy.io.savemat` and the expected
output is what torchvision's own `SVHN` class makes of them (its md5 check is bypassed, as these are not
the real files): `data = transpose(X, (3, 2, 0, 1))`, labels with 10 → 0, and `__getitem__`'s PIL image
as HWC uint8.

Content: N = 5 images of H = 5 × W = 7 (not square, so a transposed read fails) from numpy's PCG64
(`default_rng(SEED)`), labels [10, 1, 5, 10, 9] as a float64 column like SVHN's `y`. The real files are
32×32; the reader takes any [H, W, 3, N] and the size does not change the layout.

Writes:  tests/fixtures/svhn/plain.mat          savemat(..., do_compression=False): miMATRIX elements
         tests/fixtures/svhn/compressed.mat     savemat(..., do_compression=True): miCOMPRESSED (zlib)
         tests/fixtures/svhn/no_x.mat           only `y` (the reader must say `X` is missing)
         tests/fixtures/svhn/images.npy         uint8 [N, H, W, 3]: np.asarray(SVHN(...)[i][0])
         tests/fixtures/svhn/labels.npy         int64 [N]: SVHN(...)[i][1]
Source:  scipy 1.17.1, torchvision 0.26.0, numpy 2.4.6 (the project's fixture venv), seed 20261127.
Run:     .deps/venv/bin/python tools/make_svhn_fixture.py   (make fixtures-venv first); a rerun writes the
         same bytes but for the creation time savemat puts in each .mat header's text
Tolerance used by the tests: none, pixels and labels must be equal.
"""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import scipy
import scipy.io
import torchvision
from torchvision.datasets import SVHN

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "svhn"
SEED = 20261127
N, H, W = 5, 5, 7
LABELS = [10, 1, 5, 10, 9]


def torchvision_decode(mat: Path) -> tuple[np.ndarray, np.ndarray]:
    """What `torchvision.datasets.SVHN(split="test")` yields for `mat`, as HWC images and labels."""
    with tempfile.TemporaryDirectory() as root:
        shutil.copy(mat, Path(root) / "test_32x32.mat")
        SVHN._check_integrity = lambda self: True  # the md5 is the real file's
        ds = SVHN(root, split="test", download=False)
        images = np.stack([np.asarray(ds[i][0]) for i in range(len(ds))])
        labels = np.array([ds[i][1] for i in range(len(ds))], dtype=np.int64)
    return images, labels


def main() -> None:
    rng = np.random.default_rng(SEED)
    x = rng.integers(0, 256, size=(H, W, 3, N), dtype=np.uint8)  # MATLAB's X(h, w, c, n)
    y = np.array(LABELS, dtype=np.float64).reshape(N, 1)
    OUT.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(OUT / "plain.mat", {"X": x, "y": y}, do_compression=False)
    scipy.io.savemat(OUT / "compressed.mat", {"X": x, "y": y}, do_compression=True)
    scipy.io.savemat(OUT / "no_x.mat", {"y": y}, do_compression=False)

    images, labels = torchvision_decode(OUT / "plain.mat")
    again, again_labels = torchvision_decode(OUT / "compressed.mat")
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)
    assert images.shape == (N, H, W, 3) and labels.tolist() == [0, 1, 5, 0, 9]
    np.save(OUT / "images.npy", images)
    np.save(OUT / "labels.npy", labels)
    print(f"wrote {OUT} (scipy {scipy.__version__}, torchvision {torchvision.__version__})")


if __name__ == "__main__":
    main()
