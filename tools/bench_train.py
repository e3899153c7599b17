#!/usr/bin/env python3
"""Benchmark of stage 4: `dream-ood train` (Dream-OOD method) against the same training in PyTorch, on the same
data, network, batch, loss, optimiser and CPU threads, in one run.

The workload: a CIFAR-stem ResNet-18 on 32x32 images, 8 ID classes x 48 PNGs (ID batch 64) and 384 generated
"outlier" PNGs of 64x64 (outlier batch 64, resized to 32 first), the CIFAR augmentation (flip, RandomCrop(32, 4)),
loss CE(ID) + 2.5 * CE(phi(logsumexp(logits)), ID = 1 / outlier = 0) with phi = Linear(1, 2), one forward pass of
[ID; outliers] (`batching = "concat"`), SGD Nesterov 0.9, weight decay 5e-4, per-step cosine. 6 steps of
64 + 64 images per epoch, 2 epochs; the number reported is epoch 2 (epoch 1 warms up allocators and caches).

Contenders, each in its own process:
  - dream-ood train (release binary): libtorch and the decoding pool with --threads T;
  - PyTorch 2.11: torch.set_num_threads(T), torchvision ImageFolder-style datasets with the same transforms,
    DataLoader(num_workers=T, persistent_workers=True), the network of tools/make_resnet_fixtures.py (the same
    layout and names as src/nn/).
images/s = (ID + outlier images of the epoch) / wall seconds of the epoch's steps, data waits included.

Run: cargo build --release && .deps/venv/bin/python tools/bench_train.py [--threads T] [--repeat N]
Data is written once into target/bench/train/ (ignored by git).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "target" / "bench" / "train"
CLASSES, PER_CLASS, OUTLIERS, BATCH, EPOCHS, BETA = 8, 48, 384, 64, 2, 2.5


def make_data() -> None:
    from PIL import Image

    if (DATA / "generate" / "manifest.jsonl").exists():
        return
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        d = DATA / "train" / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
            img = Image.fromarray(base).resize((32, 32), Image.BILINEAR)
            img.save(d / f"{i}.png")
    gen = DATA / "generate"
    lines = []
    for i in range(OUTLIERS):
        c = i % CLASSES
        (gen / str(c)).mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (64, 64, 3)).astype(np.uint8))
        img.save(gen / str(c) / f"{i}.png")
        lines.append(json.dumps({"file": f"{c}/{i}.png", "class_index": c}))
    (gen / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def run_dream_ood(threads: int) -> float:
    out = DATA / f"run-rust-{threads}"
    if out.exists():
        for f in out.iterdir():
            f.unlink()
    config = DATA / "bench.toml"
    config.write_text(
        "[run]\nout_dir = \"run\"\nseed = 0\ndevice = \"cpu\"\n\n"
        "[data]\nsize = 32\npadding = 4\naugment = \"flip_crop\"\n"
        "[data.train]\nformat = \"folder\"\npath = \"train\"\n\n"
        f"[train]\nmethod = \"dream_ood\"\ndepth = \"resnet18\"\nepochs = {EPOCHS}\nbatch = {BATCH}\n"
        f"outlier_batch = {BATCH}\nbeta = {BETA}\noutliers = \"generate\"\n"
    )
    binary = ROOT / "target" / "release" / "dream-ood"
    subprocess.run([str(binary), "-q", "train", str(config), "--threads", str(threads), "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return rows[-1]["images_per_s"]


def run_pytorch(threads: int) -> float:
    import torch
    import torch.nn.functional as F
    import torchvision.transforms as T
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tools"))
    from make_resnet_fixtures import Classifier

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    mean = [x / 255 for x in [125.3, 123.0, 113.9]]
    std = [x / 255 for x in [63.0, 62.1, 66.7]]
    train_t = T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(32, padding=4), T.ToTensor(), T.Normalize(mean, std)])
    out_t = T.Compose([T.Resize(32), T.RandomHorizontalFlip(), T.RandomCrop(32, padding=4), T.ToTensor(),
                       T.Normalize(mean, std)])

    class Files(torch.utils.data.Dataset):
        def __init__(self, items, transform):
            self.items, self.transform = items, transform

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            path, label = self.items[i]
            return self.transform(Image.open(path).convert("RGB")), label

    ids = [(p, c) for c in range(CLASSES) for p in sorted((DATA / "train" / f"class{c}").glob("*.png"))]
    outs = [(DATA / "generate" / json.loads(line)["file"], 0)
            for line in (DATA / "generate" / "manifest.jsonl").read_text().splitlines()]
    loader = lambda items, t: torch.utils.data.DataLoader(  # noqa: E731
        Files(items, t), batch_size=BATCH, shuffle=True, num_workers=threads, persistent_workers=True)
    loader_in, loader_out = loader(ids, train_t), loader(outs, out_t)

    net = Classifier("resnet18", "cifar", CLASSES)
    phi = torch.nn.Linear(1, 2)
    opt = torch.optim.SGD(list(net.parameters()) + list(phi.parameters()), 0.1, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    total = EPOCHS * min(len(loader_in), len(loader_out))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1e-6 / 0.1 + (1 - 1e-6 / 0.1) * 0.5 * (1 + math.cos(s / total * math.pi)))
    net.train()
    rate = 0.0
    for _ in range(EPOCHS):
        start, images = time.perf_counter(), 0
        for (x_in, y), (x_out, _) in zip(loader_in, loader_out):
            x = torch.cat([x_in, x_out])
            _, logits = net(x)
            n = len(x_in)
            ce = F.cross_entropy(logits[:n], y)
            u = torch.logsumexp(logits, 1, keepdim=True)
            target = torch.cat([torch.ones(n), torch.zeros(len(x_out))]).long()
            loss = ce + BETA * F.cross_entropy(phi(u), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            images += len(x)
        rate = images / (time.perf_counter() - start)
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=1, help="alternate the two contenders this many times")
    ap.add_argument("--only", choices=["dream-ood", "pytorch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    make_data()
    if args.only == "pytorch":
        print(json.dumps(run_pytorch(args.threads)))
        return
    results = {"dream-ood": [], "pytorch": []}
    for _ in range(args.repeat):
        results["dream-ood"].append(run_dream_ood(args.threads))
        # PyTorch in a fresh process, as dream-ood runs in one.
        out = subprocess.run([sys.executable, __file__, "--only", "pytorch", "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True)
        results["pytorch"].append(json.loads(out.stdout.strip().splitlines()[-1]))
    import torch

    print(f"threads {args.threads}, torch {torch.__version__}, {os.cpu_count()} cores")
    print("| contender | images/s (epoch 2, each run) | median |")
    print("|---|---|---|")
    for name, rates in results.items():
        med = float(np.median(rates))
        print(f"| {name} | {', '.join(f'{r:.1f}' for r in rates)} | {med:.1f} |")
    ratio = float(np.median(results["dream-ood"]) / np.median(results["pytorch"]))
    print(f"dream-ood / pytorch = {ratio:.3f}")
    (DATA / "results.json").write_text(json.dumps({"threads": args.threads, **results, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
