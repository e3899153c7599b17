#!/usr/bin/env python3
"""Golden outputs of the ResNets of `src/nn/`, computed by PyTorch, for the parity tests.

Why: dream-ood's networks must compute what PyTorch computes and use PyTorch's parameter names, so that
checkpoints move both ways (the official Dream-OOD checkpoints use `encoder.*` + `fc.*`/`trans.*`, with
`shortcut.0`/`shortcut.1` for the projection shortcut). Shipping real weights would take megabytes, so every
parameter and buffer is filled by a formula that the Rust test evaluates too (`fill` below, mirrored in
`src/nn/tests`): value(name, i) = base + amp * sin(0.7 * i + phase(name)), phase = (sum of the name's UTF-8
bytes) * 0.01, with base/amp by role (conv/linear weight: amp sqrt(3/fan_in); BN weight 1 + 0.1 sin; bias
0.1 sin; running_mean 0.1 sin; running_var 1.25 + 0.25 sin). The input is x[i] = sin(0.01 * i), [2, 3, 32, 32].

The networks are written here from the architecture description (He et al. 2016; CIFAR stem: 3x3 conv
stride 1, no max-pool; ImageNet stem: 7x7 conv stride 2 + 3x3 max-pool stride 2), with `num_classes` 10.

Writes tests/fixtures/nn/resnet_outputs.safetensors: for each `<arch>_<stem>`: `.eval.features`,
`.eval.logits`, `.train.logits` (BatchNorm with batch statistics); and tests/fixtures/nn/resnet_names.json:
per network, its parameter and buffer names with shapes, in PyTorch's state_dict order; and
tests/fixtures/nn/resnet_state_dict.json: the full state_dict keys with shapes and dtypes.

Run: make fixtures-venv && .deps/venv/bin/python tools/make_resnet_fixtures.py
Tolerance used by the tests: 1e-4 absolute on logits and features (f32, different conv algorithms).
"""

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "nn"


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottle(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes * 4:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class Encoder(nn.Module):
    def __init__(self, block, blocks, stem):
        super().__init__()
        self.stem = stem
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, n, stride) in enumerate(zip([64, 128, 256, 512], blocks, [1, 2, 2, 2])):
            layers = []
            for s in [stride] + [1] * (n - 1):
                layers.append(block(cin, planes, s))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.dim = cin

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            out = F.max_pool2d(out, 3, 2, 1)
        for i in range(1, 5):
            out = getattr(self, f"layer{i}")(out)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


class Classifier(nn.Module):
    def __init__(self, arch, stem, num_classes=10):
        super().__init__()
        block, blocks = {"resnet18": (Basic, [2, 2, 2, 2]), "resnet34": (Basic, [3, 4, 6, 3]),
                         "resnet50": (Bottle, [3, 4, 6, 3])}[arch]
        self.encoder = Encoder(block, blocks, stem)
        self.fc = nn.Linear(self.encoder.dim, num_classes)

    def forward(self, x):
        feats = self.encoder(x)
        return feats, self.fc(feats)


def fill(name: str, shape) -> torch.Tensor:
    n = math.prod(shape)
    phase = sum(name.encode()) * 0.01
    s = torch.sin(0.7 * torch.arange(n, dtype=torch.float64) + phase)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "weight" and len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        v = math.sqrt(3.0 / fan_in) * s
    elif leaf == "weight":
        v = 1.0 + 0.1 * s
    elif leaf == "bias" or leaf == "running_mean":
        v = 0.1 * s
    elif leaf == "running_var":
        v = 1.25 + 0.25 * s
    else:
        raise ValueError(name)
    return v.to(torch.float32).reshape(shape)


def main() -> None:
    tensors, names, full_keys = {}, {}, {}
    x = torch.sin(0.01 * torch.arange(2 * 3 * 32 * 32, dtype=torch.float64)).to(torch.float32).reshape(2, 3, 32, 32)
    for arch in ["resnet18", "resnet34", "resnet50"]:
        for stem in ["cifar", "imagenet"]:
            key = f"{arch}_{stem}"
            model = Classifier(arch, stem)
            state = {}
            full_keys[key] = [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
            for k, v in model.state_dict().items():
                if k.endswith("num_batches_tracked"):
                    continue
                state[k] = fill(k, tuple(v.shape))
            model.load_state_dict(state, strict=False)
            names[key] = [[k, list(v.shape)] for k, v in state.items()]
            with torch.no_grad():
                model.eval()
                feats, logits = model(x)
                tensors[f"{key}.eval.features"] = feats.contiguous()
                tensors[f"{key}.eval.logits"] = logits.contiguous()
                model.train()
                _, logits = model(x)
                tensors[f"{key}.train.logits"] = logits.contiguous()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "resnet_outputs.safetensors"
    save_file(tensors, str(path), metadata={"made_by": f"tools/make_resnet_fixtures.py with torch {torch.__version__}"})
    (OUT / "resnet_names.json").write_text(json.dumps(names, indent=0) + "\n")
    # The complete state_dict keys (with num_batches_tracked), shapes and dtypes: what a dream-ood checkpoint
    # must hold for PyTorch's strict load_state_dict.
    (OUT / "resnet_state_dict.json").write_text(json.dumps(full_keys, indent=0) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes) and resnet_names.json")


if __name__ == "__main__":
    main()
