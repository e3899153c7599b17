//! The shipped demo Stable Diffusion (`onnx/demo-sd/`, made by `tools/make_demo_sd.py`): dream-ood opens
//! it with no configuration, the classes file's anchors are the CLIP ids its model card lists (computed there
//! with transformers' `CLIPTokenizer`), and `generate` makes 32×32 RGB images from it.

use std::fs::File;
use std::path::{Path, PathBuf};

use dream_ood::diffusion::classes::Classes;
use ndarray::{Array3, s};
use ndarray_npy::WriteNpyExt;

use crate::common::{run_clean, stderr};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn demo_sd_opens_and_its_anchors_are_clips() {
    let classes = Classes::load(&root().join("configs/classes/fashion-mnist.toml")).unwrap();
    let (tokens, anchors) =
        dream_ood::latent::tokens::from_sd_model(&root().join("onnx/demo-sd"), &classes).unwrap();
    assert_eq!(
        anchors,
        vec![
            14907, 23172, 44020, 2595, 7356, 42185, 2523, 24781, 3365, 8087
        ]
    );
    assert_eq!(tokens.dim(), (10, 64));
}

#[test]
fn demo_sd_generates_small_rgb_images() {
    let dir = tempfile::tempdir().unwrap();
    let classes = Classes::load(&root().join("configs/classes/fashion-mnist.toml")).unwrap();
    let (tokens, _) =
        dream_ood::latent::tokens::from_sd_model(&root().join("onnx/demo-sd"), &classes).unwrap();
    // Each class's own token row: the plain class prompt.
    let mut emb = Array3::<f32>::zeros((10, 1, 64));
    for c in 0..10 {
        emb.slice_mut(s![c, 0, ..]).assign(&tokens.row(c));
    }
    let e = dir.path().join("e.npy");
    emb.write_npy(File::create(&e).unwrap()).unwrap();
    let args = [
        "generate",
        "--model",
        root().join("onnx/demo-sd").to_str().unwrap(),
        "--embeddings",
        e.to_str().unwrap(),
        "--classes",
        root()
            .join("configs/classes/fashion-mnist.toml")
            .to_str()
            .unwrap(),
        "--out",
        "out",
        "--total",
        "3",
        "--steps",
        "5",
        "--image-size",
        "32",
    ]
    .map(str::to_owned);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_clean(dir.path(), &args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest = std::fs::read_to_string(dir.path().join("out/manifest.jsonl")).unwrap();
    assert_eq!(manifest.lines().count(), 3);
    for line in manifest.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let path = Path::new(dir.path())
            .join("out")
            .join(v["file"].as_str().or(v["path"].as_str()).unwrap());
        let img = image::open(&path).unwrap();
        assert_eq!((img.width(), img.height()), (32, 32), "{}", path.display());
        assert_eq!(img.color().channel_count(), 3);
    }
}
