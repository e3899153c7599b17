//! Stage 3's pipeline against diffusers on a tiny random SD export (`tools/make_tiny_sd_fixture.py`): the
//! tokenizer against transformers' `CLIPTokenizer`, and whole images against diffusers'
//! `StableDiffusionPipeline` fed the same prompt embeddings (built by the official row-overwrite method) and
//! the same initial latents, within 2/255 per pixel, for PNDM and DDIM at batch 1 and 3.

use std::path::PathBuf;

use dream_ood::diffusion::model_dir::SdModelDir;
use dream_ood::diffusion::pipeline::{Quantize, SamplerSettings, StableDiffusion};
use dream_ood::diffusion::schedulers::SchedulerKind;
use dream_ood::diffusion::session::SessionOptions;
use dream_ood::diffusion::text_encoder::Injection;
use dream_ood::diffusion::tokenizer::ClipTokenizer;
use ndarray::{ArrayD, IxDyn};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_sd")
}

fn goldens() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("goldens.json")).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn load() -> StableDiffusion {
    load_from(&fixture().join("model"))
}

fn load_from(root: &std::path::Path) -> StableDiffusion {
    let dir = SdModelDir::open(root).unwrap();
    let opts = SessionOptions {
        intra_threads: 1,
        ..Default::default()
    };
    StableDiffusion::load(dir, &opts).unwrap()
}

#[test]
fn tokenizer_matches_transformers() {
    let tokenizer = ClipTokenizer::from_dir(&fixture().join("model/tokenizer")).unwrap();
    for case in goldens()["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tokenizer.encode(text).unwrap(), want, "{text:?}");
    }
}

/// Injecting the anchor token's own row changes nothing; injecting another vector changes the embedding
/// exactly at the anchor's positions' influence (the encoder is causal: earlier positions are untouched).
#[test]
fn injection_of_the_own_row_is_the_plain_encoding() {
    let mut sd = load();
    let ids = vec![
        sd.tokenizer
            .encode("A high-quality image of the cat")
            .unwrap(),
    ];
    let anchor = sd.tokenizer.anchor_token("cat").unwrap();
    let position = ids[0]
        .iter()
        .position(|&t| t == anchor)
        .expect("the anchor is in the prompt");
    let own_row = sd
        .text_encoder
        .token_table()
        .row(anchor as usize)
        .unwrap()
        .to_vec();
    let plain = sd.text_encoder.encode(&ids, &[None]).unwrap();
    let same = sd
        .text_encoder
        .encode(
            &ids,
            &[Some(Injection {
                token: anchor,
                vector: &own_row,
            })],
        )
        .unwrap();
    assert_eq!(plain, same);

    let other: Vec<f32> = own_row.iter().map(|x| -x + 0.3).collect();
    let changed = sd
        .text_encoder
        .encode(
            &ids,
            &[Some(Injection {
                token: anchor,
                vector: &other,
            })],
        )
        .unwrap();
    let diff_at = |p: usize| {
        let a = plain.index_axis(ndarray::Axis(1), p);
        let b = changed.index_axis(ndarray::Axis(1), p);
        (&a - &b).iter().fold(0f32, |m, x| m.max(x.abs()))
    };
    assert_eq!(
        diff_at(position - 1),
        0.0,
        "causal: positions before the anchor are untouched"
    );
    assert!(diff_at(position) > 1e-3);
}

#[test]
fn images_match_diffusers() {
    assert_images_match_diffusers(&mut load(), 2, "optimum >= 1.24 layout");
}

/// Copies `src` into `dst` recursively.
fn copy_tree(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
}

/// The other export layouts (`tools/make_sd_variant_fixtures.py`, each checked there against the base
/// graphs with onnxruntime): int32 ids, `[batch]` float and `[steps]` int64 timesteps, external weights in
/// `weights.pb` / `model.onnx_data`, and fp16 I/O. Each loads with no configuration and gives diffusers'
/// images (fp16 I/O within fp16 rounding of the latents at every step).
#[test]
fn every_export_layout_gives_the_same_images() {
    for (variant, tolerance) in [("diffusers_script", 2), ("optimum_old", 2), ("fp16_io", 3)] {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(&fixture().join("model"), dir.path());
        let overlay = fixture().join("variants").join(variant);
        for part in std::fs::read_dir(&overlay).unwrap() {
            let part = part.unwrap().file_name();
            std::fs::remove_file(dir.path().join(&part).join("model.onnx")).unwrap();
            copy_tree(&overlay.join(&part), &dir.path().join(&part));
        }
        let mut sd = load_from(dir.path());
        assert_images_match_diffusers(&mut sd, tolerance, variant);
    }
}

fn assert_images_match_diffusers(sd: &mut StableDiffusion, tolerance: u8, layout: &str) {
    for case in goldens()["pipelines"].as_array().unwrap() {
        let scheduler: SchedulerKind = case["scheduler"].as_str().unwrap().parse().unwrap();
        let batch = case["batch"].as_u64().unwrap() as usize;
        let prompts: Vec<String> = case["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_owned())
            .collect();
        let words: Vec<&str> = case["embedding_words"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap())
            .collect();
        let vectors: Vec<Vec<f32>> = case["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();
        let anchors: Vec<u32> = words
            .iter()
            .map(|w| sd.tokenizer.anchor_token(w).unwrap())
            .collect();
        let want_anchors: Vec<u32> = case["anchors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(anchors, want_anchors);
        let injections: Vec<Option<Injection>> = anchors
            .iter()
            .zip(&vectors)
            .map(|(&token, v)| Some(Injection { token, vector: v }))
            .collect();
        let cond = sd.encode_prompts(&prompts, &injections).unwrap();
        let latents =
            ArrayD::from_shape_vec(IxDyn(&[batch, 4, 8, 8]), floats(&case["latents"])).unwrap();
        let settings = SamplerSettings {
            scheduler,
            num_inference_steps: case["steps"].as_u64().unwrap() as usize,
            guidance_scale: case["guidance"].as_f64().unwrap() as f32,
        };
        let mut no_noise =
            |_: &[usize]| -> ArrayD<f32> { panic!("{scheduler:?} is deterministic") };
        let final_latents = sd
            .denoise(&cond, latents, &settings, &mut no_noise)
            .unwrap();
        let (shape, pixels) = sd.decode(&final_latents, Quantize::Round, None).unwrap();
        let want_shape: Vec<usize> = case["image_shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(shape, want_shape);
        let want: Vec<u8> = case["images_u8"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        let worst = pixels
            .iter()
            .zip(&want)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(
            worst <= tolerance,
            "{layout}: {scheduler:?} batch {batch}: worst pixel difference {worst}/255"
        );
    }
}

#[test]
fn an_incomplete_export_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("unet")).unwrap();
    std::fs::write(dir.path().join("unet/model.onnx"), b"").unwrap();
    let err = SdModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.ends_with("not a Stable Diffusion ONNX export: missing text_encoder/model.onnx, vae_decoder/model.onnx, tokenizer (expected the folder `optimum-cli export onnx` writes)"),
        "{err}"
    );
}

/// The edited text encoder is cached under the sha256 of the export's files: a second load reuses the entry
/// (its file is not rewritten) and encodes exactly as the in-memory edit; another export gets another entry;
/// a broken entry is rebuilt.
#[test]
fn the_edited_text_encoder_is_cached_by_content() {
    use dream_ood::diffusion::te_cache::{Edited, edited_text_encoder};
    use dream_ood::diffusion::text_encoder::TextEncoder;

    let cache = tempfile::tempdir().unwrap();
    let model = fixture().join("model/text_encoder/model.onnx");
    let entry_of = |e: Edited| match e {
        Edited::File { path, .. } => path,
        Edited::Bytes { .. } => panic!("expected a cached file"),
    };
    let first = entry_of(edited_text_encoder(&model, Some(cache.path())).unwrap());
    let written = std::fs::metadata(&first).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let second = entry_of(edited_text_encoder(&model, Some(cache.path())).unwrap());
    assert_eq!(first, second);
    assert_eq!(
        std::fs::metadata(&second).unwrap().modified().unwrap(),
        written
    );

    // Cached and in-memory edits encode the same.
    let tokenizer = ClipTokenizer::from_dir(&fixture().join("model/tokenizer")).unwrap();
    let ids = vec![
        tokenizer.encode("A high-quality image of the cat").unwrap(),
        tokenizer.encode("").unwrap(),
    ];
    let plain = SessionOptions {
        intra_threads: 1,
        ..Default::default()
    };
    let cached = SessionOptions {
        text_encoder_cache: Some(cache.path().to_owned()),
        ..plain.clone()
    };
    let a = TextEncoder::load(&model, &plain)
        .unwrap()
        .encode(&ids, &[None, None])
        .unwrap();
    let b = TextEncoder::load(&model, &cached)
        .unwrap()
        .encode(&ids, &[None, None])
        .unwrap();
    assert_eq!(a, b);

    // Another export (the int32-ids layout) gets its own entry.
    let other = fixture().join("variants/optimum_old/text_encoder/model.onnx");
    let third = entry_of(edited_text_encoder(&other, Some(cache.path())).unwrap());
    assert_ne!(third.parent(), first.parent());

    // A broken entry is rebuilt.
    std::fs::remove_file(first.parent().unwrap().join("token_table.npy")).unwrap();
    let rebuilt = entry_of(edited_text_encoder(&model, Some(cache.path())).unwrap());
    assert!(rebuilt.parent().unwrap().join("token_table.npy").exists());
}
