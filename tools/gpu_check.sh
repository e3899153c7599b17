#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent GPU machine (see README "Building", GPU machines).
#
# What it proves, each against the CPU run of the same command on the same machine:
#   1. `make build-gpu` builds and `doctor` registers the CUDA (and, when its libraries are there, TensorRT)
#      execution providers and sees CUDA in libtorch;
#   2. stage 1 (`latent`) and stage 2 (`sample`) run on `cuda` (the summary prints both devices' last
#      epoch loss side by side: close, not bit-equal, since the kernels differ);
#   3. stage 3 (`generate`) runs on `--ep cuda`, `--ep tensorrt` and `--devices 0,0` with the tiny SD fixture
#      and writes the same image files as the CPU run (the images are copied to OUT_DIR for comparison).
# Usage: tools/gpu_check.sh [OUT_DIR]   (writes logs and a summary to OUT_DIR, default /tmp/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/gpu_check}"
mkdir -p "$OUT"
BIN=target/gpu/release/dream-ood
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
: >"$OUT/summary.txt"

make build-gpu >"$OUT/build.log" 2>&1 || { summary "FAIL build-gpu (see build.log)"; exit 1; }
"$BIN" doctor --json >"$OUT/doctor.json" 2>"$OUT/doctor.err"; summary "doctor exit $?"

work="$OUT/work"; rm -rf "$work"; mkdir -p "$work/images"
python3 - "$work/images" <<'EOF'
import sys, zlib, struct, pathlib
root = pathlib.Path(sys.argv[1])
def png(path, w, h, rgb):
    raw = b"".join(b"\x00" + bytes(rgb(x, y) for x in range(w)) for y in range(h))
    def chunk(t, d): return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
for c in range(3):
    d = root / f"class{c}"; d.mkdir(parents=True, exist_ok=True)
    for i in range(16):
        png(d / f"{i}.png", 16, 16, lambda x, y, c=c, i=i: ((x * (c + 1) + y * 3 + i * 7) % 256))
EOF
for dev in cpu cuda; do
  cat >"$work/$dev.toml" <<EOF
[run]
out_dir = "run_$dev"
seed = 1
device = "$dev"
[data]
classes = "classes.toml"
size = 16
[data.train]
format = "folder"
path = "images"
[latent]
sd_model = "$PWD/tests/fixtures/tiny_sd/model"
depth = "resnet18"
epochs = 2
batch = 16
bank_per_class = 8
[sample]
k = 3
select = 4
anchors = 4
candidates = 50
keep = 1
per_class = 8
EOF
done
printf '[[class]]\nname = "apple"\n[[class]]\nname = "cat"\n[[class]]\nname = "dog"\n' >"$work/classes.toml"
for dev in cpu cuda; do
  (cd "$work" && "$OLDPWD/$BIN" latent "$dev.toml" && "$OLDPWD/$BIN" sample "$dev.toml") >"$OUT/stages12_$dev.log" 2>&1
  summary "latent+sample on $dev: exit $?"
done
python3 - "$work" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys, pathlib
w = pathlib.Path(sys.argv[1])
for name in ["latent/summary.json"]:
    for dev in ["cpu", "cuda"]:
        p = w / f"run_{dev}" / name
        print(dev, name, json.loads(p.read_text()).get("last_epoch_loss") if p.exists() else "missing")
EOF

for ep in cpu cuda tensorrt; do
  "$BIN" generate --model tests/fixtures/tiny_sd/model --embeddings "$work/run_cpu/sample/outliers.npy" \
    --classes "$work/classes.toml" --out "$work/gen_$ep" --per-class 2 --steps 4 --image-size 16 --ep "$ep" \
    >"$OUT/generate_$ep.log" 2>&1
  summary "generate --ep $ep: exit $?"
done
"$BIN" generate --model tests/fixtures/tiny_sd/model --embeddings "$work/run_cpu/sample/outliers.npy" \
  --classes "$work/classes.toml" --out "$work/gen_devices" --per-class 2 --steps 4 --image-size 16 --ep cuda \
  --devices 0,0 >"$OUT/generate_devices.log" 2>&1
summary "generate --devices 0,0: exit $?"
for ep in cuda tensorrt devices; do
  if [ -d "$work/gen_$ep" ]; then
    cmp <(cut -d'"' -f4 "$work/gen_cpu/manifest.jsonl" | sort) <(cut -d'"' -f4 "$work/gen_$ep/manifest.jsonl" | sort) \
      >/dev/null && summary "gen_$ep: same files as cpu" || summary "gen_$ep: file lists differ"
  fi
done
cp -r "$work"/gen_* "$OUT/" 2>/dev/null
echo "summary in $OUT/summary.txt"
