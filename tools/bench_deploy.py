#!/usr/bin/env python3
"""Benchmark of stage 7: `dream-ood score` against a Python scorer doing the same job, and `dream-ood serve`
under loopback load.

Networks: ResNet-18 with formula weights (`fill` of tools/make_export_check.py; random-like weights cost what
trained ones cost), 10 classes, energy score, threshold from a scores file. Two cases:
  - cifar:    CIFAR stem, 1024 PNGs of 32x32, evaluation transform ToTensor + Normalize;
  - imagenet: ImageNet stem, 96 JPEGs of 320x240, Resize(256) + CenterCrop(224) + Normalize.

`score` contenders, same network, batch 64, same core count, end to end from image files to score rows:
  - dream-ood: `dream-ood -q score --model M DIR --batch 64 --out rows.jsonl` (release), timed from process
    start to exit (ONNX Runtime session creation included);
  - python: Pillow decode + torchvision transforms + PyTorch eager (torch.set_num_threads(cores)), energy and
    softmax, JSONL rows; timed inside the process from the file listing to the last row (imports and model
    loading excluded, which favours Python).
Each contender runs twice; the faster run counts.

`serve`: `dream-ood serve` (release, --max-batch 32 --max-wait-ms 5) on the cifar model; closed-loop clients
(Python threads, one keep-alive connection each, raw 32x32 PNG bodies) at 1, 8 and 64 concurrent clients,
each level bounded by a request count and 20 s. The clients share the machine's cores with the server.

Run: make bench (needs `make fixtures-venv`); prints Markdown and writes target/bench-deploy/results.json.
"""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "target" / "bench-deploy"
BIN = ROOT / "target" / "release" / "dream-ood"
CORES = os.cpu_count() or 1
BATCH = 64
MEAN_CIFAR = [125.3 / 255, 123.0 / 255, 113.9 / 255]
STD_CIFAR = [63.0 / 255, 62.1 / 255, 66.7 / 255]
MEAN_IN, STD_IN = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CASES = {
    "cifar": dict(stem="cifar", count=1024, size=(32, 32), ext="png",
                  transform={"channels": 3, "transforms": [], "normalize": {"mean": MEAN_CIFAR, "std": STD_CIFAR}}),
    "imagenet": dict(stem="imagenet", count=96, size=(320, 240), ext="jpg",
                     transform={"channels": 3, "transforms": [{"resize": {"shorter": 256}},
                                                              {"center_crop": {"height": 224, "width": 224}}],
                                "normalize": {"mean": MEAN_IN, "std": STD_IN}}),
}
SERVE_LEVELS = [(1, 300), (8, 800), (64, 1280)]


def setup(name: str, case: dict) -> tuple[Path, Path, Path]:
    """Checkpoint, images and exported model of a case (made once)."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tools"))
    from make_export_check import fill
    from make_resnet_fixtures import Classifier

    d = WORK / name
    ckpt, images, model = d / "det.safetensors", d / "images", d / "det.onnx"
    if model.exists():
        return ckpt, images, model
    images.mkdir(parents=True, exist_ok=True)
    net = Classifier("resnet18", case["stem"], num_classes=10)
    state = {k: torch.zeros((), dtype=torch.int64) if k.endswith("num_batches_tracked") else fill(k, tuple(v.shape))
             for k, v in net.state_dict().items()}
    info = {"format_version": 1, "stage": "detector",
            "network": {"depth": "resnet18", "stem": case["stem"], "in_channels": 3, "head": "fc", "out_dim": 10},
            "classes": [f"c{i}" for i in range(10)], "eval_transform": case["transform"], "epoch": 0, "extra": {},
            "writer": "tools/bench_deploy.py"}
    save_file(state, str(ckpt), metadata={"dream_ood": json.dumps(info)})
    rng = np.random.default_rng(0)
    w, h = case["size"]
    for i in range(case["count"]):
        # Smooth random images (noise is unrealistically hard to compress and decode).
        base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        img.save(images / f"{i:05d}.{case['ext']}", quality=90) if case["ext"] == "jpg" else img.save(
            images / f"{i:05d}.png")
    (d / "scores.txt").write_text("".join(f"{v}\n" for v in np.linspace(-5, 5, 101)))
    subprocess.run([str(BIN), "-q", "export", "--checkpoint", str(ckpt), "--out", str(model),
                    "--calibration-scores", str(d / "scores.txt")], check=True, stdout=subprocess.DEVNULL)
    return ckpt, images, model


def python_score(ckpt: str, images: str, out: str, case_name: str) -> None:
    """The reference scorer (run in its own process by `--python-score`)."""
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from torchvision import transforms

    sys.path.insert(0, str(ROOT / "tools"))
    from make_resnet_fixtures import Classifier

    torch.set_num_threads(CORES)
    case = CASES[case_name]
    net = Classifier("resnet18", case["stem"], num_classes=10)
    net.load_state_dict(load_file(ckpt))
    net.eval()
    steps = []
    for t in case["transform"]["transforms"]:
        if "resize" in t:
            steps.append(transforms.Resize(t["resize"]["shorter"]))
        else:
            steps.append(transforms.CenterCrop(t["center_crop"]["height"]))
    n = case["transform"]["normalize"]
    tf = transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(n["mean"], n["std"])])
    classes = [f"c{i}" for i in range(10)]
    threshold = 0.0
    start = time.perf_counter()
    files = sorted(p for p in Path(images).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    with open(out, "w") as f, torch.inference_mode():
        for i in range(0, len(files), BATCH):
            chunk = files[i:i + BATCH]
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in chunk])
            _, logits = net(x)
            score = torch.logsumexp(logits, dim=1)
            conf, cls = torch.softmax(logits, dim=1).max(dim=1)
            for p, c, k, s in zip(chunk, conf.tolist(), cls.tolist(), score.tolist()):
                f.write(json.dumps({"path": str(p), "class": classes[k], "class_index": k, "confidence": c,
                                    "score": s, "is_ood": s < threshold, "threshold": threshold,
                                    "margin": s - threshold}) + "\n")
    print(json.dumps({"seconds": time.perf_counter() - start, "images": len(files)}))


def bench_score(name: str, case: dict) -> dict:
    ckpt, images, model = setup(name, case)
    rust, py = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run([str(BIN), "-q", "score", "--model", str(model), str(images), "--batch", str(BATCH),
                        "--out", str(WORK / name / "rows.jsonl")], check=True)
        rust.append(time.perf_counter() - t0)
        r = subprocess.run([sys.executable, __file__, "--python-score", str(ckpt), str(images),
                            str(WORK / name / "rows_py.jsonl"), name], check=True, capture_output=True, text=True)
        py.append(json.loads(r.stdout.strip().splitlines()[-1])["seconds"])
    # Same rows: the two scorers agree on every image.
    ours = [json.loads(l) for l in open(WORK / name / "rows.jsonl")]
    theirs = [json.loads(l) for l in open(WORK / name / "rows_py.jsonl")]
    worst = max(abs(a["score"] - b["score"]) for a, b in zip(ours, theirs))
    n = case["count"]
    return {"case": name, "images": n, "dream_ood_s": min(rust), "python_s": min(py),
            "dream_ood_img_s": n / min(rust), "python_img_s": n / min(py), "ratio": min(py) / min(rust),
            "max_score_diff": worst, "runs": {"dream_ood": rust, "python": py}}


def bench_serve() -> list[dict]:
    model = WORK / "cifar" / "det.onnx"
    body = (WORK / "cifar" / "images" / "00000.png").read_bytes()
    proc = subprocess.Popen([str(BIN), "-q", "serve", "--model", str(model), "--addr", "127.0.0.1:0",
                             "--max-batch", "32", "--max-wait-ms", "5"], stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    host, port = url.removeprefix("http://").split(":")
    results = []
    try:
        for clients, total in SERVE_LEVELS:
            latencies, lock, errors = [], threading.Lock(), [0]
            deadline = time.perf_counter() + 20.0
            counter = [0]

            def client() -> None:
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                while True:
                    with lock:
                        if counter[0] >= total or time.perf_counter() > deadline:
                            break
                        counter[0] += 1
                    t0 = time.perf_counter()
                    conn.request("POST", "/v1/score", body, {"Content-Type": "image/png"})
                    resp = conn.getresponse()
                    resp.read()
                    dt = time.perf_counter() - t0
                    with lock:
                        latencies.append(dt)
                        errors[0] += resp.status != 200
                conn.close()

            threads = [threading.Thread(target=client) for _ in range(clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            lat = np.array(latencies) * 1000
            results.append({"clients": clients, "requests": len(latencies), "errors": errors[0],
                            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                            "req_s": len(latencies) / wall})
        conn = http.client.HTTPConnection(host, int(port))
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
        batches = float(next(l.split()[1] for l in metrics.splitlines() if l.startswith("dream_ood_batches_total")))
        images = float(next(l.split()[1] for l in metrics.splitlines() if l.startswith("dream_ood_batch_images_total")))
        results.append({"mean_batch": images / batches})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return results


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--python-score":
        python_score(*sys.argv[2:])
        return
    if not BIN.exists():
        sys.exit(f"{BIN} not found: run `cargo build --release` (make bench does)")
    WORK.mkdir(parents=True, exist_ok=True)
    out = {"cores": CORES, "score": [bench_score(n, c) for n, c in CASES.items()], "serve": bench_serve()}
    (WORK / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"| case | images | dream-ood img/s | python img/s | ratio | max |score diff| |\n|---|---|---|---|---|---|")
    for r in out["score"]:
        print(f"| {r['case']} | {r['images']} | {r['dream_ood_img_s']:.1f} | {r['python_img_s']:.1f} | "
              f"{r['ratio']:.2f}x | {r['max_score_diff']:.1e} |")
    print("\n| clients | requests | errors | p50 ms | p99 ms | req/s |\n|---|---|---|---|---|---|")
    for r in out["serve"][:-1]:
        print(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['req_s']:.1f} |")
    print(f"\nmean images per session run: {out['serve'][-1]['mean_batch']:.2f}")


if __name__ == "__main__":
    main()
