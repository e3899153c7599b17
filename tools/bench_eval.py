#!/usr/bin/env python3
"""Benchmark of evaluation (`dream-ood eval`): the collect pass and the fitted scores, against PyTorch / numpy
runs of the reference implementations, on the same data, cores and threads.

1. Collect throughput (images/s): a ResNet-18 (CIFAR stem, 10 classes, seeded random weights written as a
   dream-ood checkpoint) scores 2,000 + 200 PNG images of 32x32 (ImageFolder layout, made once into
   .deps/bench/eval/). Contenders, each a fresh process:
     - dream-ood eval --scores energy (release binary, protocol full, no plots): wall time of the process;
     - PyTorch: torchvision ImageFolder + ToTensor + Normalize, DataLoader(batch 200, workers = cores),
       model.eval() under no_grad, energy = logsumexp; wall time of the process, and of the loop alone.
2. Fitted scores at CIFAR-100 scale: 50,000 x 512 ID training features (100 classes), 10,000 x 512 test
   features, a 100 x 512 head (numpy default_rng(0)). Fit + score times of:
     - dream-ood (examples/bench_eval_scores.rs, release): KNN k = 50, Mahalanobis, ViM dim 300;
     - the references: KNN as knn-ood / OpenOOD (exact flat L2 search; faiss is not installed, so the same
       search in PyTorch: q^2 + z^2 - 2 q.z in float32 chunks, kthvalue); Mahalanobis as OpenOOD `mds`
       (scikit-learn EmpiricalCovariance, then per batch of 200 and per class (f - mu) P (f - mu)^T .diag());
       ViM as OpenOOD `vim` (numpy pinv, EmpiricalCovariance, np.linalg.eig, norms).
   The script also checks that dream-ood's scores equal the references' (max relative difference).

Run: make bench-eval (needs `make fixtures-venv`); prints Markdown tables, writes .deps/bench/eval/results.json.
"""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".deps" / "bench" / "eval"
CORES = os.cpu_count() or 1
N_TEST, N_OOD, SIDE = 2000, 200, 32
MEAN = [125.3 / 255, 123.0 / 255, 113.9 / 255]
STD = [63.0 / 255, 62.1 / 255, 66.7 / 255]


def make_images(root: Path, n: int, classes: int, seed: int) -> None:
    from PIL import Image

    if root.exists():
        return
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"c{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)).save(d / f"{i:05d}.png")


def make_checkpoint(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tools"))
    from make_resnet_fixtures import Classifier

    if path.exists():
        return
    torch.manual_seed(0)
    model = Classifier("resnet18", "cifar")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    info = {"format_version": 1, "stage": "detector",
            "network": {"depth": "resnet18", "stem": "cifar", "in_channels": 3, "head": "fc", "out_dim": 10},
            "classes": [f"c{i:02d}" for i in range(10)],
            "eval_transform": {"channels": 3, "transforms": [], "normalize": {"mean": MEAN, "std": STD}},
            "epoch": 0, "extra": {"method": "bench"}, "writer": "tools/bench_eval.py"}
    save_file(state, str(path), metadata={"dream_ood": json.dumps(info)})


def timed(cmd, env=None):
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{out.stderr}")
    return wall, out.stdout


TORCH_LOOP = r"""
import sys, time, json, torch, torchvision.transforms as T
from torchvision.datasets import ImageFolder
sys.path.insert(0, sys.argv[1]); from make_resnet_fixtures import Classifier
from safetensors.torch import load_file
torch.set_num_threads(int(sys.argv[4]))
model = Classifier("resnet18", "cifar"); model.load_state_dict(load_file(sys.argv[2])); model.eval()
tf = T.Compose([T.ToTensor(), T.Normalize(json.loads(sys.argv[5]), json.loads(sys.argv[6]))])
t = time.perf_counter(); n = 0
for root in sys.argv[3].split(","):
    loader = torch.utils.data.DataLoader(ImageFolder(root, tf), batch_size=200, shuffle=False,
                                         num_workers=int(sys.argv[4]))
    with torch.no_grad():
        for x, _ in loader:
            _, logits = model(x); torch.logsumexp(logits, 1); n += len(x)
print(json.dumps({"images": n, "loop_s": time.perf_counter() - t}))
"""


def bench_collect(binary: Path) -> dict:
    make_images(BENCH / "id_test", N_TEST, 10, 1)
    make_images(BENCH / "ood", N_OOD, 1, 2)
    ckpt = BENCH / "model.safetensors"
    make_checkpoint(ckpt)
    cfg = BENCH / "bench.toml"
    cfg.write_text(f'[run]\nout_dir = "run"\ndevice = "cpu"\n[data]\ntest = {{ format = "folder", path = "id_test" }}\n'
                   f'ood.noise = {{ format = "folder", path = "ood" }}\n[eval]\nprotocol = "full"\nplots = false\n')
    rust_s, _ = timed([str(binary), "-q", "eval", str(cfg), "--checkpoint", f"bench={ckpt}", "--scores", "energy"])
    py_s, out = timed([sys.executable, "-c", TORCH_LOOP, str(ROOT / "tools"), str(ckpt),
                       f"{BENCH / 'id_test'},{BENCH / 'ood'}", str(CORES), json.dumps(MEAN), json.dumps(STD)])
    loop = json.loads(out)
    n = N_TEST + N_OOD
    return {"images": n, "dream_ood_s": rust_s, "torch_process_s": py_s, "torch_loop_s": loop["loop_s"]}


def features():
    d = BENCH / "features"
    if (d / "head_bias.npy").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    c, dim = 100, 512
    centres = rng.normal(0.5, 0.5, size=(c, dim))
    labels = np.arange(50_000) % c
    train = np.maximum(centres[labels] + rng.normal(0, 1, size=(50_000, dim)), 0).astype(np.float32)
    test = np.maximum(centres[rng.integers(0, c, 10_000)] + rng.normal(0, 1.3, size=(10_000, dim)), 0).astype(np.float32)
    np.save(d / "train_features.npy", train)
    np.save(d / "train_labels.npy", labels.astype(np.int64))
    np.save(d / "test_features.npy", test)
    np.save(d / "head_weight.npy", rng.normal(0, 0.05, size=(c, dim)).astype(np.float32))
    np.save(d / "head_bias.npy", rng.normal(0, 0.05, size=c).astype(np.float32))
    return d


def reference_scores(d: Path) -> tuple[dict, dict]:
    import torch
    from numpy.linalg import norm, pinv
    from scipy.special import logsumexp
    from sklearn.covariance import EmpiricalCovariance

    torch.set_num_threads(CORES)
    train, labels, test = (np.load(d / f) for f in ["train_features.npy", "train_labels.npy", "test_features.npy"])
    w, b = np.load(d / "head_weight.npy"), np.load(d / "head_bias.npy")
    times, scores = {}, {}

    t = time.perf_counter()  # KNN: knn-ood normaliser, exact flat-L2 search (faiss's arithmetic) in torch
    normalize = lambda x: x / (np.linalg.norm(x, ord=2, axis=-1, keepdims=True) + 1e-10)  # noqa: E731
    bank = torch.from_numpy(normalize(train))
    q_all = torch.from_numpy(normalize(test))
    bank_sq = (bank ** 2).sum(1)
    out = []
    for q in q_all.split(1024):
        dist = (q ** 2).sum(1, keepdim=True) + bank_sq[None] - 2 * q @ bank.T
        out.append(-dist.kthvalue(50, dim=1).values)
    scores["knn"] = torch.cat(out).double().numpy()
    times["knn"] = time.perf_counter() - t

    t = time.perf_counter()  # Mahalanobis: OpenOOD mds
    feats, lab = torch.from_numpy(train), torch.from_numpy(labels)
    means, centred = [], []
    for c in range(w.shape[0]):
        s = feats[lab.eq(c)]
        means.append(s.mean(0))
        centred.append(s - means[c].view(1, -1))
    means = torch.stack(means)
    precision = torch.from_numpy(EmpiricalCovariance(assume_centered=False).fit(torch.cat(centred).numpy())
                                 .precision_).float()
    out = []
    for f in torch.from_numpy(test).split(200):
        cs = torch.stack([-torch.matmul(torch.matmul(f - means[c].view(1, -1), precision),
                                        (f - means[c].view(1, -1)).t()).diag() for c in range(w.shape[0])], 1)
        out.append(cs.max(1)[0])
    scores["mahalanobis"] = torch.cat(out).double().numpy()
    times["mahalanobis"] = time.perf_counter() - t

    t = time.perf_counter()  # ViM: OpenOOD vim
    u = -np.matmul(pinv(w), b)
    ec = EmpiricalCovariance(assume_centered=True).fit(train - u)
    eig_vals, eigen_vectors = np.linalg.eig(ec.covariance_)
    ns = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[300:]]).T)
    alpha = (train @ w.T + b).max(axis=-1).mean() / norm(np.matmul(train - u, ns), axis=-1).mean()
    scores["vim"] = logsumexp(test @ w.T + b, axis=-1) - alpha * norm(np.matmul(test - u, ns), axis=-1)
    times["vim"] = time.perf_counter() - t
    return times, scores


def main() -> None:
    binary = ROOT / "target" / "release" / "dream-ood"
    example = ROOT / "target" / "release" / "examples" / "bench_eval_scores"
    for b in [binary, example]:
        if not b.exists():
            raise SystemExit(f"{b} missing: cargo build --release --bins --examples")
    collect = bench_collect(binary)
    d = features()
    _, out = timed([str(example), str(d), "50", "300"])
    rust = json.loads(out)
    ref, ref_scores = reference_scores(d)
    agree = {}
    for k, v in ref_scores.items():
        r = np.load(d / f"rust_{k}.npy")
        agree[k] = float(np.max(np.abs(r - v) / np.maximum(np.abs(v), 1e-3)))
    results = {"cores": CORES, "collect": collect, "scores_rust_s": rust, "scores_reference_s": ref,
               "max_rel_diff": agree, "peak_rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    (BENCH / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    c = collect
    print(f"| collect ({c['images']} images, 32 px, ResNet-18) | images/s |\n|---|---:|")
    print(f"| dream-ood eval (process) | {c['images'] / c['dream_ood_s']:.0f} |")
    print(f"| PyTorch (process) | {c['images'] / c['torch_process_s']:.0f} |")
    print(f"| PyTorch (loop only) | {c['images'] / c['torch_loop_s']:.0f} |\n")
    print("| score (50k x 512 fit, 10k scored) | dream-ood s | reference s | ratio | max rel. diff |\n|---|---:|---:|---:|---:|")
    for k in ["knn", "mahalanobis", "vim"]:
        print(f"| {k} | {rust[k]:.2f} | {ref[k]:.2f} | {ref[k] / rust[k]:.1f}x | {agree[k]:.1e} |")


if __name__ == "__main__":
    main()
