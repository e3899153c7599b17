#!/usr/bin/env python3
"""Make the ONNX model that `dream-ood doctor` runs as its ONNX Runtime smoke test, and its expected output.

Why: doctor must prove that the ONNX Runtime library it loaded really computes, not just that it opened. The
model is a two-layer MLP (Gemm -> Relu -> Gemm -> Softmax, opset 17, dynamic batch axis) with weights drawn
from numpy's PCG64 with seed 0; the expected output for a fixed input is what Python onnxruntime computes, so
the reference is ONNX Runtime's own Python binding, not code of ours. The model passes onnx's full checker.

Writes (both embedded into the binary with include_bytes!/include_str!):
  tests/fixtures/doctor/tiny_mlp.onnx
  tests/fixtures/doctor/tiny_mlp_expected.json   input, expected probabilities, tolerance, versions

Run: make fixtures-venv && .deps/venv/bin/python tools/make_doctor_fixture.py
Tolerance: 1e-5 absolute (f32 softmax of small logits; Rust and Python use the same ORT build).
"""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "doctor"


def main() -> None:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 8)).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    w2 = rng.standard_normal((8, 3)).astype(np.float32)
    b2 = rng.standard_normal(3).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["h_relu"], name="relu"),
        helper.make_node("Gemm", ["h_relu", "w2", "b2"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "dream_ood_doctor_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(a, n) for a, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="dream-ood tools")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "tiny_mlp.onnx"
    onnx.save(model, path)

    x = np.array([[0.5, -1.0, 2.0, 0.25], [-0.75, 0.1, 0.0, 1.5]], dtype=np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (probs,) = sess.run(["probs"], {"x": x})
    expected = {
        "input_name": "x",
        "output_name": "probs",
        "input_shape": list(x.shape),
        "input": [float(v) for v in x.ravel()],
        "expected": [float(v) for v in probs.ravel()],
        "atol": 1e-5,
        "made_by": f"tools/make_doctor_fixture.py with onnx {onnx.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}",
    }
    (OUT / "tiny_mlp_expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes) and tiny_mlp_expected.json")


if __name__ == "__main__":
    main()
