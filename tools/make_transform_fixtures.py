#!/usr/bin/env python3
"""Make the reference outputs that `dream_ood::data::transforms` must reproduce (tests/data.rs).

Why: the official Dream-OOD scripts preprocess with torchvision on PIL images (SPEC-dream-ood.md §1.4, §4.2,
§5.3), and a trained detector is only comparable if its inputs are the same numbers. So each transform is run
here through torchvision itself and the Rust port is checked against the result.

Random transforms are made deterministic by recording torchvision's own draws: `torch.rand`, `torch.randint`
and `torch.Tensor.uniform_` are wrapped so every call's range and result are written to the case. The Rust
test replays them through its `Draws` trait and must ask for the same ranges in the same order and produce
the same pixels. This covers RandomHorizontalFlip, RandomCrop(padding), RandomResizedCrop (including its
10-try fallback, forced with scale (0.99, 1) on a 100×10 image), Grayscale (RGB and gray),
RandomApply([GaussianBlur(k, sigma)], p) (k 3 and 5, p 1 and 0.5, RGB and 1-channel) and whole pipelines,
the demo's among them (configs/demo.toml: a gray 28×28 made RGB, RandomCrop → blur → Normalize; outliers
Resize → Grayscale → RandomCrop). `F.gaussian_blur` is also run alone with a fixed σ (`blurs` in
cases.json): sides just above half the window, where reflect padding is at its limit, and windows of 9
and 11, whose kernel sum torch vectorises.

Inputs: small PNGs generated below from numpy's PCG64 (`default_rng(SEED)`): noise, gradients and a smooth
pattern, RGB and gray, odd sizes so that every rounding rule is exercised. Images added later are drawn
after the earlier ones, so rerunning reproduces every existing file byte for byte.

Source: torchvision 0.26.0, torch 2.11, Pillow 13.0, numpy 2.4 (the project's fixture venv), seed 20261126,
on an x86-64 CPU (the blur's float32 sums follow torch's x86 kernels).
Writes:  tests/fixtures/data/images/*        the inputs (PNG; JPEG and WebP for the decoding check)
         tests/fixtures/data/cases.json      every case: image, channels, transforms, normalisation, draws,
                                             expected-output file, and for resizes the tensor-path file;
                                             `blurs` (F.gaussian_blur alone) and `blur_nearest_tie`
         tests/fixtures/data/out/*.npy       expected outputs: uint8 HWC (PIL image) or float32 CHW (tensor)
Run:     /work/main/.deps/venv/bin/python tools/make_transform_fixtures.py   (or make fixtures-venv first)
Tolerance: 0 on every PIL-path output (uint8 and float32 alike: Pillow's fixed-point resampler is ported
exactly, and ToTensor/Normalize are the same float32 operations). GaussianBlur too: it is a float32 conv2d
rounded to uint8, and the Rust port does torch's arithmetic (kernel summed in torch's order, one fused
multiply-add per tap; torch does not fuse for 1-channel 3×3 windows, a last-bit difference). To show how
much the order matters, each blur is run again on the float image and the distance of the sum nearest to a
.5 tie is recorded as `blur_nearest_tie`: 3e-5 levels, one pixel of blur_k5_0 and of blur_half_0 (same
draws), which a kernel summed left to right gets 1 level wrong. Resize is also compared with torchvision's
tensor path (`antialias=True` on a float tensor): that path does not round to uint8 between its two passes nor
at the end, so it differs from Pillow by up to `tensor_path_max_abs_diff` levels (recorded in cases.json; the
test allows that bound). Decoding (`RawImage::open` against `np.asarray(Image.open(...))`): PNG and WebP
exact; JPEG within 3 levels (mean under 0.5) because zune-jpeg and libjpeg-turbo round their IDCT and chroma
upsampling differently.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms._functional_tensor as F_t
import torchvision.transforms.functional as F
from PIL import Image

SEED = 20261126
ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "data"
CIFAR = ([x / 255 for x in [125.3, 123.0, 113.9]], [x / 255 for x in [63.0, 62.1, 66.7]])
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
DEMO = ([0.286] * 3, [0.353] * 3)  # configs/demo.toml [data] mean, std (Fashion-MNIST, gray made RGB)

# --- recording torch's draws -------------------------------------------------------------------------
DRAWS = []
_randint, _rand, _uniform = torch.randint, torch.rand, torch.Tensor.uniform_


def _rec_randint(*args, **kwargs):
    t = _randint(*args, **kwargs)
    lo, hi = (0, args[0]) if len(args) == 1 or not isinstance(args[1], int) else (args[0], args[1])
    DRAWS.append({"kind": "randint", "lo": int(lo), "hi": int(hi), "value": int(t.item())})
    return t


def _rec_rand(*args, **kwargs):
    t = _rand(*args, **kwargs)
    DRAWS.append({"kind": "rand", "lo": 0.0, "hi": 1.0, "value": float(t.item())})
    return t


def _rec_uniform(self, a=0.0, b=1.0, *, generator=None):
    r = _uniform(self, a, b, generator=generator)
    DRAWS.append({"kind": "uniform", "lo": float(a), "hi": float(b), "value": float(r.item())})
    return r


torch.randint, torch.rand, torch.Tensor.uniform_ = _rec_randint, _rec_rand, _rec_uniform

# --- how close each blur's float32 sums come to a .5 tie ---------------------------------------------
# F.gaussian_blur calls F_t.gaussian_blur, which rounds its float32 correlation to uint8. Running it again
# on the float image gives the same sums unrounded; a sum far from .5 rounds the same whatever the order
# of its additions, so the distance bounds how much the Rust port's order may matter.
TIE_DISTANCES = []
_blur = F_t.gaussian_blur


def _rec_blur(img, kernel_size, sigma):
    if not img.is_floating_point():
        raw = _blur(img.float(), kernel_size, sigma)
        TIE_DISTANCES.append(float((raw - raw.floor() - 0.5).abs().min()))
    return _blur(img, kernel_size, sigma)


F_t.gaussian_blur = _rec_blur


# --- inputs --------------------------------------------------------------------------------------------
def make_images(rng):
    yy, xx = np.mgrid[0:48, 0:64]
    smooth = np.stack(
        [
            127 + 120 * np.sin(xx / 5.0) * np.cos(yy / 7.0),
            127 + 120 * np.sin((xx + yy) / 9.0),
            255 * xx / 63.0,
        ],
        axis=-1,
    )
    gy, gx = np.mgrid[0:31, 0:20]
    gray = np.clip(8 * gx + 3 * gy + rng.integers(-20, 21, size=gx.shape), 0, 255)
    images = {
        "rgb_37x23": Image.fromarray(rng.integers(0, 256, size=(23, 37, 3), dtype=np.uint8), "RGB"),
        "gray_20x31": Image.fromarray(gray.astype(np.uint8), "L"),
        "rgb_64x48": Image.fromarray(np.round(smooth).astype(np.uint8), "RGB"),
        "rgb_32x32": Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8), "RGB"),
        "rgb_100x10": Image.fromarray(rng.integers(0, 256, size=(10, 100, 3), dtype=np.uint8), "RGB"),
    }
    # Added for Grayscale and GaussianBlur, drawn after the images above so that those stay the same:
    # a Fashion-MNIST-like 28×28 (a bright textured blob on black) and images whose sides are just
    # above half a blur window.
    fy, fx = np.mgrid[0:28, 0:28]
    blob = np.exp(-((((fx - 13.5) / 8.0) ** 2 + ((fy - 14.0) / 11.0) ** 2) ** 2))
    stripes = 1 + 0.25 * np.sin(fx / 1.3)
    fashion = np.clip(230 * blob * stripes + rng.integers(-15, 16, size=fx.shape), 0, 255)
    images.update({
        "gray_28x28": Image.fromarray(fashion.astype(np.uint8), "L"),
        "gray_3x3": Image.fromarray(rng.integers(0, 256, size=(3, 3), dtype=np.uint8), "L"),
        "rgb_7x4": Image.fromarray(rng.integers(0, 256, size=(4, 7, 3), dtype=np.uint8), "RGB"),
        "rgb_3x6": Image.fromarray(rng.integers(0, 256, size=(6, 3, 3), dtype=np.uint8), "RGB"),
    })
    (ROOT / "images").mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        img.save(ROOT / "images" / f"{name}.png")
    return images


# --- transform specs (the JSON the Rust test parses) and their torchvision objects ----------------------
def tv(spec, channels):
    k = spec["kind"]
    if k == "resize":
        return T.Resize(spec["size"], interpolation=T.InterpolationMode.BILINEAR)
    if k == "center_crop":
        return T.CenterCrop(spec["size"])
    if k == "random_crop":
        return T.RandomCrop(spec["size"], padding=spec["padding"])
    if k == "random_horizontal_flip":
        return T.RandomHorizontalFlip(spec["p"])
    if k == "random_resized_crop":
        return T.RandomResizedCrop(spec["size"], scale=tuple(spec["scale"]), ratio=tuple(spec["ratio"]))
    if k == "grayscale":
        return T.Grayscale(num_output_channels=channels)
    if k == "random_gaussian_blur":
        return T.RandomApply([T.GaussianBlur(spec["kernel"], sigma=tuple(spec["sigma"]))], p=spec["p"])
    raise ValueError(k)


def run_case(cases, name, images, image, transforms, channels=3, normalize=None, seed=0):
    img = images[image].convert("RGB" if channels == 3 else "L")
    steps = [tv(s, channels) for s in transforms]
    if normalize is not None:
        steps.append(T.ToTensor())
        if normalize != "none":
            mean, std = {"cifar": CIFAR, "imagenet": IMAGENET, "demo": DEMO}[normalize]
            steps.append(T.Normalize(mean[:channels], std[:channels]))
    torch.manual_seed(seed)
    DRAWS.clear()
    out = T.Compose(steps)(img)
    arr = out.numpy().astype(np.float32) if isinstance(out, torch.Tensor) else np.asarray(out, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]  # gray PIL → HWC with C = 1
    (ROOT / "out").mkdir(exist_ok=True)
    np.save(ROOT / "out" / f"{name}.npy", arr)
    case = {
        "name": name,
        "image": f"images/{image}.png",
        "channels": channels,
        "transforms": transforms,
        "normalize": normalize,
        "draws": list(DRAWS),
        "expected": f"out/{name}.npy",
    }
    cases.append(case)
    return case, img


def main():
    rng = np.random.default_rng(SEED)
    images = make_images(rng)
    cases = []
    tensor_diff = 0.0

    # Resize: down, up, mixed, large factors; each also through torchvision's tensor path.
    resizes = [
        ("rgb_37x23", 16), ("gray_20x31", 16), ("rgb_64x48", 16), ("rgb_37x23", 50), ("gray_20x31", 45),
        ("rgb_64x48", [70, 13]), ("rgb_64x48", [5, 7]), ("gray_20x31", [31, 7]), ("rgb_100x10", 32),
    ]
    for i, (image, size) in enumerate(resizes):
        channels = 1 if image.startswith("gray") else 3
        case, img = run_case(cases, f"resize_{i}", images, image, [{"kind": "resize", "size": size}], channels)
        x = torch.from_numpy(np.array(img, dtype=np.float32).reshape(img.height, img.width, channels))
        t = F.resize(x.permute(2, 0, 1), size, interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        t = t.numpy().astype(np.float32)
        np.save(ROOT / "out" / f"resize_{i}_tensor.npy", t)
        case["tensor_path"] = f"out/resize_{i}_tensor.npy"
        pil = np.load(ROOT / case["expected"]).transpose(2, 0, 1).astype(np.float32)
        tensor_diff = max(tensor_diff, float(np.abs(pil - t).max()))

    # CenterCrop: odd differences (round half to even), equal sizes, and crops larger than the image.
    for i, (image, size) in enumerate(
        [("rgb_37x23", [15, 10]), ("gray_20x31", [40, 30]), ("rgb_64x48", [47, 63]), ("rgb_37x23", [23, 40])]
    ):
        channels = 1 if image.startswith("gray") else 3
        run_case(cases, f"center_crop_{i}", images, image, [{"kind": "center_crop", "size": size}], channels)

    # ToTensor + Normalize; gray to 3 channels; plain ToTensor on 1 channel.
    run_case(cases, "tensor_cifar_rgb", images, "rgb_37x23", [], 3, "cifar")
    run_case(cases, "tensor_cifar_gray_as_rgb", images, "gray_20x31", [], 3, "cifar")
    run_case(cases, "tensor_imagenet", images, "rgb_64x48", [], 3, "imagenet")
    run_case(cases, "tensor_plain_gray", images, "gray_20x31", [], 1, "none")

    # Random transforms with recorded draws.
    for s in range(3):
        run_case(cases, f"random_crop_{s}", images, "rgb_37x23",
                 [{"kind": "random_crop", "size": [24, 30], "padding": 4}], 3, seed=s)
    for s in range(4):
        run_case(cases, f"flip_{s}", images, "rgb_37x23",
                 [{"kind": "random_horizontal_flip", "p": 0.5}], 3, seed=s)
    rrc = {"kind": "random_resized_crop", "size": [24, 24], "scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3]}
    for s in range(6):
        run_case(cases, f"rrc_{s}", images, "rgb_64x48", [rrc], 3, seed=s)
    fallback = dict(rrc, size=[8, 8], scale=[0.99, 1.0])
    case, _ = run_case(cases, "rrc_fallback", images, "rgb_100x10", [fallback], 3, seed=0)
    assert len(case["draws"]) == 20, "the fallback case must exhaust all 10 tries"

    # Whole pipelines of the official code (SPEC §1.4, §4.2, §5.3), float32 output.
    cifar_train = [{"kind": "random_horizontal_flip", "p": 0.5},
                   {"kind": "random_crop", "size": [32, 32], "padding": 4}]
    for s in range(3):
        run_case(cases, f"pipeline_cifar_train_{s}", images, "rgb_32x32", cifar_train, 3, "cifar", seed=s)
    outliers = [{"kind": "resize", "size": 32}, {"kind": "random_crop", "size": [32, 32], "padding": 4},
                {"kind": "random_horizontal_flip", "p": 0.5}]
    for s in range(2):
        run_case(cases, f"pipeline_cifar_outliers_{s}", images, "rgb_64x48", outliers, 3, "cifar", seed=s)
    in_train = [dict(rrc, size=[16, 16]), {"kind": "random_horizontal_flip", "p": 0.5}]
    for s in range(3):
        run_case(cases, f"pipeline_imagenet_train_{s}", images, "rgb_64x48", in_train, 3, "imagenet", seed=s)
    in_test = [{"kind": "resize", "size": 20}, {"kind": "center_crop", "size": [16, 16]}]
    for image in ["rgb_37x23", "gray_20x31", "rgb_64x48"]:
        run_case(cases, f"pipeline_imagenet_test_{image}", images, image, in_test, 3, "imagenet")

    # Grayscale(num_output_channels = the image's): PIL's luma, back to RGB; a no-op on gray.
    run_case(cases, "grayscale_rgb", images, "rgb_37x23", [{"kind": "grayscale"}], 3)
    run_case(cases, "grayscale_gray", images, "gray_20x31", [{"kind": "grayscale"}], 1)

    # RandomApply([GaussianBlur(k, sigma=(0.1, 2))], p): p = 1 (always blurred: draws rand, then σ), on
    # RGB and on 1-channel images; p = 0.5, where a draw above p skips the blur and σ is not drawn.
    for k in (3, 5):
        for s, image in enumerate(["rgb_37x23", "gray_20x31", "rgb_64x48"]):
            blur = {"kind": "random_gaussian_blur", "kernel": k, "sigma": [0.1, 2.0], "p": 1.0}
            channels = 1 if image.startswith("gray") else 3
            run_case(cases, f"blur_k{k}_{s}", images, image, [blur], channels, seed=s)
    half = {"kind": "random_gaussian_blur", "kernel": 5, "sigma": [0.1, 2.0], "p": 0.5}
    n_draws = [len(run_case(cases, f"blur_half_{s}", images, "rgb_37x23", [half], 3, seed=s)[0]["draws"])
               for s in range(6)]
    assert set(n_draws) == {1, 2}, f"p = 0.5 must both skip and blur: {n_draws}"

    # The demo's pipelines (configs/demo.toml: size 28, padding 2, augment "crop", id_blur p 0.5 σ 0.1..2,
    # outlier_gray; DataConfig::train_pipeline and outlier_pipeline): a gray 28×28 made RGB, then
    # RandomCrop → RandomGaussianBlur(5) → ToTensor → Normalize; outliers Resize → Grayscale → RandomCrop.
    demo_train = [{"kind": "random_crop", "size": [28, 28], "padding": 2}, dict(half)]
    n_draws = [len(run_case(cases, f"pipeline_demo_train_{s}", images, "gray_28x28", demo_train, 3, "demo",
                            seed=s)[0]["draws"]) for s in range(4)]
    assert set(n_draws) == {3, 4}, f"the demo cases must both skip and blur: {n_draws}"
    demo_outliers = [{"kind": "resize", "size": 28}, {"kind": "grayscale"},
                     {"kind": "random_crop", "size": [28, 28], "padding": 2}]
    for s in range(2):
        run_case(cases, f"pipeline_demo_outliers_{s}", images, "rgb_64x48", demo_outliers, 3, "demo", seed=s)

    # F.gaussian_blur alone with a fixed σ (taken as float32, as torch divides a float32 tensor by it):
    # sides just above half the window (reflect padding at its limit, PyTorch needs pad < side), a
    # 1-channel 3×3 window, and windows of 9 and 11, whose kernel sum torch vectorises.
    blurs = []
    for name, image, channels, k, sigma in [
        ("edge_gray_3x3_k5", "gray_3x3", 1, 5, 1.5), ("edge_gray_3x3_k3", "gray_3x3", 1, 3, 0.7),
        ("edge_rgb_7x4_k7", "rgb_7x4", 3, 7, 0.7), ("edge_rgb_3x6_k5", "rgb_3x6", 3, 5, 2.0),
        ("gray_28x28_as_rgb_k9", "gray_28x28", 3, 9, 1.7), ("rgb_64x48_k11", "rgb_64x48", 3, 11, 1.9),
    ]:
        img = images[image].convert("RGB" if channels == 3 else "L")
        arr = np.asarray(F.gaussian_blur(img, [k, k], [sigma, sigma]), dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        np.save(ROOT / "out" / f"blur_{name}.npy", arr)
        blurs.append({"name": name, "image": f"images/{image}.png", "channels": channels, "kernel": k,
                      "sigma": sigma, "expected": f"out/blur_{name}.npy"})

    # RandomResizedCrop.get_params alone, many draws, several shapes (the crop box only).
    params = []
    for shape in [(48, 64), (23, 37), (10, 100), (300, 7)]:
        dummy = Image.new("RGB", (shape[1], shape[0]))
        for s in range(25):
            torch.manual_seed(1000 + s)
            DRAWS.clear()
            i, j, h, w = T.RandomResizedCrop.get_params(dummy, [0.08, 1.0], [3 / 4, 4 / 3])
            params.append({"height": shape[0], "width": shape[1], "scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3],
                           "draws": list(DRAWS), "box": [i, j, h, w]})

    # Decoding lossy formats: Pillow (libjpeg-turbo, libwebp) against the Rust decoders (zune-jpeg,
    # image-webp). The pixels a network sees depend on the decoder, so record Pillow's.
    decodes = []
    for name, fmt, opts in [("smooth_jpeg", "JPEG", {"quality": 90}), ("noise_jpeg", "JPEG", {"quality": 75}),
                            ("smooth_gray_jpeg", "JPEG", {"quality": 90}),
                            ("smooth_webp", "WEBP", {"quality": 80}), ("lossless_webp", "WEBP", {"lossless": True})]:
        src = images["gray_20x31" if "gray" in name else ("rgb_37x23" if "noise" in name else "rgb_64x48")]
        ext = "jpg" if fmt == "JPEG" else "webp"
        path = ROOT / "images" / f"{name}.{ext}"
        src.save(path, fmt, **opts)
        arr = np.asarray(Image.open(path), dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        np.save(ROOT / "out" / f"decode_{name}.npy", arr)
        decodes.append({"image": f"images/{name}.{ext}", "expected": f"out/decode_{name}.npy",
                        "lossless": name.startswith("lossless")})

    doc = {
        "source": f"torchvision {torchvision.__version__}, torch {torch.__version__}, "
                  f"Pillow {Image.__version__}, numpy {np.__version__}, seed {SEED}",
        "tolerance": 0.0,
        "tensor_path_max_abs_diff": math.ceil(tensor_diff * 1000) / 1000,
        "cases": cases,
        "rrc_params": params,
        "decodes": decodes,
        "blurs": blurs,
        "blur_nearest_tie": math.floor(min(TIE_DISTANCES) * 1e6) / 1e6,
    }
    (ROOT / "cases.json").write_text(json.dumps(doc, indent=1) + "\n")
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    print(f"{len(cases)} cases, {len(params)} crop boxes, {len(blurs)} blurs, tensor-path max |diff| "
          f"{tensor_diff:.4f} levels, blur sums at least {min(TIE_DISTANCES):.2e} from a .5 tie, "
          f"{total / 1024:.0f} KiB in {ROOT}")


if __name__ == "__main__":
    main()
