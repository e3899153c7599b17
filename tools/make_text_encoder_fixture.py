#!/usr/bin/env python3
"""Make a tiny Stable-Diffusion-style CLIP text encoder in ONNX, for the tests of the text-encoder graph edit.

Why: stage 3 injects an outlier embedding in place of a class token, which needs the text encoder's token
lookup (`Gather(token_embedding.weight, input_ids)`) turned into a graph input. The tests edit this model
and must get exactly what the original computes when fed `W[ids]`. The model is a randomly initialised
`transformers.CLIPTextModel` (seed 0) with SD 1.x's layout but tiny sizes (vocab 1000, hidden 32, 2 layers,
4 heads, 77 positions), exported the way SD exports are: `input_ids` int32 [batch, sequence] in,
`last_hidden_state` and `pooler_output` out, opset 17, legacy TorchScript exporter (`dynamo=False`).

Writes:
  tests/fixtures/text_encoder/model.onnx       the encoder (about 250 KB)
  tests/fixtures/text_encoder/expected.json    input ids and PyTorch's outputs for them

Run: make fixtures-venv && .deps/venv/bin/python tools/make_text_encoder_fixture.py
Tolerance used by the tests: 1e-5 absolute between ONNX Runtime and PyTorch (f32).
"""

import json
from pathlib import Path

import onnx
import torch
import transformers
from transformers import CLIPTextConfig, CLIPTextModel

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "text_encoder"


class Encoder(torch.nn.Module):
    def __init__(self, model: CLIPTextModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids)
        return out.last_hidden_state, out.pooler_output


def main() -> None:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=998,
        eos_token_id=999,
        pad_token_id=999,
    )
    model = CLIPTextModel(config).eval()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "model.onnx"
    ids = torch.full((2, 77), 999, dtype=torch.int32)
    ids[0, :6] = torch.tensor([998, 320, 1 + 17, 539, 42, 999], dtype=torch.int32)
    ids[1, :4] = torch.tensor([998, 5, 42, 999], dtype=torch.int32)
    with torch.no_grad():
        last, pooled = Encoder(model)(ids)
        torch.onnx.export(
            Encoder(model),
            (ids,),
            str(path),
            input_names=["input_ids"],
            output_names=["last_hidden_state", "pooler_output"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "last_hidden_state": {0: "batch", 1: "sequence"},
                          "pooler_output": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    expected = {
        "input_ids_shape": list(ids.shape),
        "input_ids": ids.flatten().tolist(),
        "last_hidden_state": last.flatten().tolist(),
        "pooler_output": pooled.flatten().tolist(),
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "atol": 1e-5,
        "made_by": f"tools/make_text_encoder_fixture.py with torch {torch.__version__}, "
                   f"transformers {transformers.__version__}, onnx {onnx.__version__}",
    }
    (OUT / "expected.json").write_text(json.dumps(expected) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes) and expected.json")


if __name__ == "__main__":
    main()
