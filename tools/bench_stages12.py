#!/usr/bin/env python3
"""Benchmarks of stages 1 and 2 against Python references on the same cores, in the same run.

Stage 2 (`dream-ood sample`): the CIFAR-100 sampling settings (bank rows 500 x 768 per class, K = 300,
select = 50 boundary points, 1500 Gaussian candidates each, keep 2 per boundary point, sigma 0.07) on a random
bank, CLASSES classes x CALLS sampler calls each (the full CIFAR-100 job is 100 classes x 100 calls; one
call is 75,000 candidates x 500 rows x 768 dims of kNN, the same work every time, so calls/s scales).
  - dream-ood: the release binary, `--mode official` and `--mode intended`, end to end (process start to
    exit: reading the bank, every call, writing the .npy);
  - numpy + faiss-cpu: a re-enactment of the official code (scripts/KNN.py, get_embed_cifar100.py, SPEC §2):
    faiss.IndexFlatL2 over the normalised class bank, boundary points by the K-th neighbour distance, noise
    from numpy, candidates normalised, kNN-filtered with the same index, `view(length, -1)` top-k as coded.
    faiss runs with omp threads = cores.

Stage 1 (`dream-ood latent`): training images/s, same network (ResNet-18 CIFAR stem + trans 512 -> 768),
batch, loss (CE(cos/tau)) and optimiser (SGD Nesterov), on synthetic CIFAR-format data (32x32 RGB, 10
classes, the CIFAR-100 binary layout):
  - dream-ood: `latent` with the CIFAR augmentation (flip + crop with padding) decoded on its rayon pool;
    the rate of the second epoch from its log (the first includes warm-up);
  the two contenders alternate S1_REPEAT times in ABBA order (each run ~30 s) and the table gives every rate, the medians
  and the median of the per-pair ratios;
  - PyTorch eager: the same network (tools/make_resnet_fixtures.py's modules) and step on tensors already
    in memory, no augmentation and no data loading at all: the compute-only upper bound. The goal (issue #4)
    is >= 0.95x of it, i.e. data loading hidden behind compute.

Run: make bench, or `.deps/venv/bin/python tools/bench_stages12.py [stage1] [--repeat=N]` (needs `make fixtures-venv` and faiss-cpu: .deps/venv/bin/pip install faiss-cpu==1.15.1).
Prints a Markdown table and writes .deps/bench/stages12.json.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".deps" / "bench" / "stages12"
BIN = ROOT / "target" / "release" / "dream-ood"
CORES = os.cpu_count() or 1

# Stage 2 settings (the official CIFAR-100 outlier settings) and the bench size.
K, SELECT, ANCHORS, CANDIDATES, KEEP, SIGMA, ROWS, DIM = 300, 50, 50, 1500, 2, 0.07, 500, 768
CLASSES, CALLS = 2, 3

# Stage 1 bench size.
S1_IMAGES, S1_BATCH, S1_CLASSES, S1_EPOCHS = 640, 64, 10, 2
# Alternating runs of each stage-1 contender (`--repeat=N` overrides).
S1_REPEAT = 5


def timed(cmd, env=None):
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return dt


# ------------------------------------------------------------------------------------------------ stage 2


def stage2_inputs():
    BENCH.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((CLASSES, ROWS, DIM), dtype=np.float32)
    tokens = rng.standard_normal((CLASSES, DIM), dtype=np.float32) * 0.02
    np.save(BENCH / "bank.npy", bank)
    np.save(BENCH / "tokens.npy", tokens)
    return bank, tokens


def faiss_official(bank, tokens, seed=0):
    """The official get_embed_cifar100.py / KNN.py loop with faiss IndexFlatL2 and numpy noise."""
    import faiss

    faiss.omp_set_num_threads(CORES)
    rng = np.random.default_rng(seed)
    out = []
    for c in range(CLASSES):
        unit = bank[c] / np.linalg.norm(bank[c], axis=1, keepdims=True)
        index = faiss.IndexFlatL2(DIM)
        index.add(unit)
        kept = []
        for _ in range(CALLS):
            d, _ = index.search(unit, K)  # boundary: K-th neighbour distance
            boundary = np.argsort(-d[:, -1], kind="stable")[:SELECT]
            picked = boundary[rng.choice(SELECT, ANCHORS, replace=False)]
            noise = rng.standard_normal((CANDIDATES, DIM), dtype=np.float32)
            cand = np.repeat(unit[picked], CANDIDATES, axis=0) + SIGMA * np.tile(noise, (ANCHORS, 1))
            cand /= np.linalg.norm(cand, axis=1, keepdims=True)
            dc, _ = index.search(np.ascontiguousarray(cand, dtype=np.float32), K)
            table = dc[:, -1].reshape(CANDIDATES, -1)  # the official view(length, -1)
            rows = np.argsort(-table, axis=0, kind="stable")[:KEEP]  # [KEEP, ANCHORS]
            flat = np.concatenate([i * CANDIDATES + rows[:, i] for i in range(rows.shape[1])])
            kept.append(cand[flat])
        out.append(np.concatenate(kept) * np.linalg.norm(tokens[c]))
    return np.stack(out)


def bench_stage2():
    bank, tokens = stage2_inputs()
    per_class = CALLS * ANCHORS * KEEP
    rows = []
    for mode in ["official", "intended"]:
        cmd = [str(BIN), "-q", "sample", "--bank", str(BENCH / "bank.npy"), "--tokens", str(BENCH / "tokens.npy"),
               "--out", str(BENCH / f"out_{mode}.npy"), "--mode", mode, "--k", str(K), "--select", str(SELECT),
               "--anchors", str(ANCHORS), "--candidates", str(CANDIDATES), "--keep", str(KEEP),
               "--sigma", str(SIGMA), "--per-class", str(per_class), "--device", "cpu",
               "--threads", str(CORES)]
        rows.append((f"dream-ood sample --mode {mode}", timed(cmd)))
    t0 = time.perf_counter()
    out = faiss_official(bank, tokens)
    rows.append(("numpy + faiss-cpu (official code)", time.perf_counter() - t0))
    assert out.shape == (CLASSES, per_class, DIM)
    return rows


# ------------------------------------------------------------------------------------------------ stage 1


def stage1_inputs():
    d = BENCH / "cifar"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    labels = np.arange(S1_IMAGES) % S1_CLASSES
    pixels = rng.integers(0, 256, (S1_IMAGES, 3 * 32 * 32), dtype=np.uint8)
    records = np.concatenate([np.zeros((S1_IMAGES, 1), np.uint8), labels[:, None].astype(np.uint8), pixels], 1)
    records.tofile(d / "train.bin")
    records[:64].tofile(d / "test.bin")
    tokens = rng.standard_normal((S1_CLASSES, DIM), dtype=np.float32) * 0.02
    np.save(BENCH / "tokens10.npy", tokens)
    cfg = BENCH / "latent.toml"
    cfg.write_text(f"""[run]
out_dir = "run"
seed = 0
device = "cpu"
threads = {CORES}
[data.train]
format = "cifar100"
path = "cifar"
[latent]
tokens = "tokens10.npy"
depth = "resnet18"
epochs = {S1_EPOCHS}
batch = {S1_BATCH}
bank_per_class = 1
""")
    return cfg, pixels, labels, tokens


def torch_stage1(pixels, labels, tokens):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "tools"))
    from make_resnet_fixtures import Classifier  # the same ResNet written from the architecture

    torch.set_num_threads(CORES)
    torch.manual_seed(0)
    net = Classifier("resnet18", "cifar")
    net.fc = torch.nn.Linear(512, DIM)  # the stage-1 head (trans)
    x_all = torch.from_numpy(pixels.reshape(-1, 3, 32, 32)).float().div(255)
    y_all = torch.from_numpy(labels).long()
    t = F.normalize(torch.from_numpy(tokens), dim=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    net.train()
    rates = []
    for _ in range(S1_EPOCHS):
        perm = torch.randperm(S1_IMAGES)
        t0 = time.perf_counter()
        for i in range(0, S1_IMAGES, S1_BATCH):
            idx = perm[i : i + S1_BATCH]
            _, f = net(x_all[idx])
            loss = F.cross_entropy(F.normalize(f, dim=1) @ t.T / 0.1, y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        rates.append(S1_IMAGES / (time.perf_counter() - t0))
    return rates[-1]


def bench_stage1(repeat):
    """Alternates the two contenders `repeat` times: single runs on a shared machine vary by about 10%."""
    cfg, pixels, labels, tokens = stage1_inputs()
    run = BENCH / "run"
    ours, theirs, waits = [], [], []
    for i in range(repeat):
        # ABBA order, so that a drift of the machine over a pair does not always favour the same contender.
        for contender in ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours"):
            if contender == "theirs":
                theirs.append(torch_stage1(pixels, labels, tokens))
                continue
            subprocess.run(["rm", "-rf", str(run)], check=True)
            timed([str(BIN), "-q", "latent", str(cfg)])
            log = [json.loads(l) for l in (run / "latent" / "log.jsonl").read_text().splitlines()]
            ours.append(log[-1]["images_per_s"])
            waits.append((log[-1]["data_wait_s"], log[-1]["seconds"]))
    return ours, theirs, waits


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--repeat=")]
    repeat = next((int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--repeat=")), S1_REPEAT)
    if not BIN.exists():
        sys.exit("build the release binary first: make build")
    results = {"cores": CORES}
    if args != ["stage1"]:
        print_stage2(bench_stage2(), results)
    ours, theirs, waits = bench_stage1(repeat)
    ratios = [o / t for o, t in zip(ours, theirs)]
    print(
        f"\nStage 1: ResNet-18 (CIFAR stem) + trans, batch {S1_BATCH}, {S1_IMAGES} images/epoch, epoch {S1_EPOCHS}, "
        f"{repeat} alternating runs of each\n"
    )
    print("| contender | images/s (each run) | median | ratio of medians |\n|---|---|---:|---:|")
    each = lambda rates: ", ".join(f"{r:.1f}" for r in rates)
    print(
        f"| dream-ood latent (decode + augment + train) | {each(ours)} | {np.median(ours):.1f} "
        f"| {np.median(ours) / np.median(theirs):.2f}x |"
    )
    print(f"| PyTorch eager, tensors in memory (compute only) | {each(theirs)} | {np.median(theirs):.1f} | 1.00x |")
    print(f"\nper-pair ratios {', '.join(f'{r:.2f}' for r in ratios)}; median {np.median(ratios):.2f}x")
    worst = max(w / s for w, s in waits)
    print(f"dream-ood waited for data at most {100 * worst:.2f}% of an epoch (log.jsonl data_wait_s / seconds)")
    results["stage1"] = {
        "dream_ood_images_per_s": ours,
        "pytorch_images_per_s": theirs,
        "median_pair_ratio": float(np.median(ratios)),
        "dream_ood_data_wait_s_and_epoch_s": waits,
    }
    (BENCH / "stages12.json").write_text(json.dumps(results, indent=2) + "\n")


def print_stage2(s2, results):
    ref = s2[-1][1]
    print(f"\nStage 2: {CLASSES} classes x {CALLS} calls (75,000 candidates x 500 x 768 kNN per call), {CORES} cores\n")
    print("| contender | seconds | calls/s | vs faiss |\n|---|---:|---:|---:|")
    for name, secs in s2:
        print(f"| {name} | {secs:.2f} | {CLASSES * CALLS / secs:.2f} | {ref / secs:.2f}x |")
    results["stage2"] = [{"contender": n, "seconds": s} for n, s in s2]


if __name__ == "__main__":
    main()
