#!/usr/bin/env python3
"""The other SD export layouts users have, made from the tiny SD fixture (tests/fixtures/tiny_sd/model).

Why: stage 3 must load every layout ../shared/reference/sd-onnx-runtime.md §2 lists with zero configuration,
reading each input's dtype and rank from the session. The tiny fixture is an optimum >= 1.24 export (int64
ids, float scalar timestep, fp32 I/O, weights inside model.onnx). This script rewrites its graphs, with the
`onnx` package, into the other layouts, keeping the arithmetic identical:

  diffusers_script/  text_encoder input_ids int32; unet timestep float [batch]; unet weights in external data
                     `weights.pb` (diffusers' convert_stable_diffusion_checkpoint_to_onnx.py)
  optimum_old/       text_encoder input_ids int32; unet timestep int64 [steps]; unet weights in external data
                     `model.onnx_data` (optimum < 1.24)
  fp16_io/           every float input and output of the three models is float16 (casts at the graph's edges;
                     the weights stay fp32, as ORT's demo engine builder keeps some I/O)

Each variant holds only the files that differ from the base folder; the Rust test (tests/tiny_sd.rs) lays
them over a copy of it. Before writing, every rewritten model is run with onnxruntime against the base model
on random inputs: the outputs must be identical (fp16_io: equal after rounding the inputs to fp16, within
fp16 output rounding), so a variant is known to compute what the base computes.

Run: make fixtures-venv && .deps/venv/bin/python tools/make_sd_variant_fixtures.py
"""

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "tests" / "fixtures" / "tiny_sd" / "model"
OUT = ROOT / "tests" / "fixtures" / "tiny_sd" / "variants"


def load(name):
    return onnx.load(str(BASE / name / "model.onnx"))


def rename_uses(graph, old, new):
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x == old:
                node.input[i] = new


def graph_input(graph, name):
    return next(i for i in graph.input if i.name == name)


def set_type(value_info, elem, dims):
    t = value_info.type.tensor_type
    t.elem_type = elem
    t.shape.ClearField("dim")
    for d in dims:
        dim = t.shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d


def int32_ids(model):
    g = model.graph
    rename_uses(g, "input_ids", "input_ids_int64")
    g.node.insert(0, helper.make_node("Cast", ["input_ids"], ["input_ids_int64"], to=TensorProto.INT64))
    set_type(graph_input(g, "input_ids"), TensorProto.INT32, ["batch_size", "sequence_length"])
    return model


def batched_timestep(model, elem, axis_name):
    """timestep of shape [n] (every entry the same step): the graph reads entry 0 as its scalar."""
    g = model.graph
    rename_uses(g, "timestep", "timestep_scalar")
    zero = helper.make_tensor("timestep_index", TensorProto.INT64, [], [0])
    g.initializer.append(zero)
    nodes = [helper.make_node("Gather", ["timestep", "timestep_index"], ["timestep_picked"], axis=0)]
    if elem == TensorProto.FLOAT:
        nodes[0].output[0] = "timestep_scalar"
    else:
        nodes.append(helper.make_node("Cast", ["timestep_picked"], ["timestep_scalar"], to=TensorProto.FLOAT))
    for n in reversed(nodes):
        g.node.insert(0, n)
    set_type(graph_input(g, "timestep"), elem, [axis_name])
    return model


def fp16_io(model):
    g = model.graph
    for inp in g.input:
        if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = inp.name + "_fp32"
        rename_uses(g, inp.name, inner)
        g.node.insert(0, helper.make_node("Cast", [inp.name], [inner], to=TensorProto.FLOAT))
        inp.type.tensor_type.elem_type = TensorProto.FLOAT16
    for out in g.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = out.name + "_fp32"
        for node in g.node:
            for i, x in enumerate(node.output):
                if x == out.name:
                    node.output[i] = inner
        rename_uses(g, out.name, inner)
        g.node.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT16))
        out.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def save(model, dest, external=None):
    dest.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=external, size_threshold=0)
    else:
        onnx.save(model, str(dest))
    onnx.checker.check_model(str(dest), full_check=True)


def feeds(name, rng, batch=2):
    if name == "text_encoder":
        return {"input_ids": rng.integers(0, 1000, (batch, 77)).astype(np.int64)}
    if name == "unet":
        return {"sample": rng.standard_normal((batch, 4, 8, 8)).astype(np.float32),
                "timestep": np.array(981.0, dtype=np.float32),
                "encoder_hidden_states": rng.standard_normal((batch, 77, 32)).astype(np.float32)}
    return {"latent_sample": rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)}


def adapt(session, base_feeds):
    """The base inputs in the variant's dtypes and ranks."""
    out = {}
    for i in session.get_inputs():
        v = base_feeds[i.name]
        if i.name == "timestep" and len(i.shape) == 1:
            v = np.full([2], v)
        np_type = {"tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(float)": np.float32,
                   "tensor(float16)": np.float16}[i.type]
        out[i.name] = v.astype(np_type)
    return out


def check(name, path):
    rng = np.random.default_rng(0)
    f = feeds(name, rng)
    base = ort.InferenceSession(str(BASE / name / "model.onnx"), providers=["CPUExecutionProvider"])
    var = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    vf = adapt(var, f)
    # What the variant's inputs mean in fp32 (fp16 inputs are rounded).
    f32 = {k: (v.astype(np.float32) if v.dtype == np.float16 else f[k]) for k, v in vf.items()}
    want = base.run(None, f32)
    got = var.run(None, vf)
    for w, g, o in zip(want, got, base.get_outputs()):
        if g.dtype == np.float16:
            ok = np.allclose(g.astype(np.float32), w, rtol=2e-3, atol=2e-3)
        else:
            ok = np.array_equal(g, w)
        if not ok:
            raise SystemExit(f"{path}: output {o.name} differs from the base model")
    print(f"ok  {path.relative_to(ROOT)}")


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    made = []
    d = OUT / "diffusers_script"
    save(int32_ids(load("text_encoder")), d / "text_encoder" / "model.onnx")
    save(batched_timestep(load("unet"), TensorProto.FLOAT, "batch"), d / "unet" / "model.onnx", "weights.pb")
    made += [("text_encoder", d), ("unet", d)]
    d = OUT / "optimum_old"
    save(int32_ids(load("text_encoder")), d / "text_encoder" / "model.onnx")
    save(batched_timestep(load("unet"), TensorProto.INT64, "steps"), d / "unet" / "model.onnx", "model.onnx_data")
    made += [("text_encoder", d), ("unet", d)]
    d = OUT / "fp16_io"
    for name in ("text_encoder", "unet", "vae_decoder"):
        save(fp16_io(load(name)), d / name / "model.onnx")
        made.append((name, d))
    for name, d in made:
        check(name, d / name / "model.onnx")


if __name__ == "__main__":
    main()
