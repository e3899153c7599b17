//! The stage-3 text-encoder edit on a real exported CLIP text encoder (`tools/make_text_encoder_fixture.py`:
//! a tiny random `transformers.CLIPTextModel` exported by `torch.onnx.export`, with PyTorch's outputs).

use std::path::{Path, PathBuf};

use dream_ood::onnx::model::{encode_model, load_model, tensor_f32};
use dream_ood::onnx::proto::ModelProto;
use dream_ood::onnx::text_encoder::{INPUTS_EMBEDS, expose_token_embeddings};
use dream_ood::runtime::ort_environment;
use ort::session::Session;
use ort::value::Tensor;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text_encoder")
}

struct Expected {
    ids_shape: Vec<usize>,
    ids: Vec<i32>,
    last_hidden_state: Vec<f32>,
    pooler_output: Vec<f32>,
    hidden: usize,
}

fn expected() -> Expected {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("expected.json")).unwrap(),
    )
    .unwrap();
    let floats = |k: &str| {
        json[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    Expected {
        ids_shape: json["input_ids_shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect(),
        ids: json["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap() as i32)
            .collect(),
        last_hidden_state: floats("last_hidden_state"),
        pooler_output: floats("pooler_output"),
        hidden: json["hidden_size"].as_u64().unwrap() as usize,
    }
}

fn session(model: &ModelProto) -> Session {
    Session::builder(ort_environment().unwrap())
        .unwrap()
        .with_intra_threads(1)
        .unwrap()
        .commit_from_memory(&encode_model(model))
        .unwrap()
}

/// Runs a text encoder; `embeds` feeds `inputs_embeds` when given. Returns (last_hidden_state, pooler_output).
fn run(
    model: &ModelProto,
    ex: &Expected,
    embeds: Option<Vec<f32>>,
    feed_ids: bool,
) -> (Vec<f32>, Vec<f32>) {
    let mut session = session(model);
    let mut inputs: Vec<(String, ort::session::SessionInputValue)> = Vec::new();
    if feed_ids {
        let ids = Tensor::from_array((ex.ids_shape.clone(), ex.ids.clone())).unwrap();
        inputs.push(("input_ids".to_owned(), ids.into()));
    }
    if let Some(embeds) = embeds {
        let shape = vec![ex.ids_shape[0], ex.ids_shape[1], ex.hidden];
        inputs.push((
            INPUTS_EMBEDS.to_owned(),
            Tensor::from_array((shape, embeds)).unwrap().into(),
        ));
    }
    let out = session.run(inputs).unwrap();
    let get = |k: &str| out[k].try_extract_tensor::<f32>().unwrap().1.to_vec();
    (get("last_hidden_state"), get("pooler_output"))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn lookup(table: &[f32], hidden: usize, ids: &[i32]) -> Vec<f32> {
    ids.iter()
        .flat_map(|&id| {
            table[id as usize * hidden..(id as usize + 1) * hidden]
                .iter()
                .copied()
        })
        .collect()
}

#[test]
fn original_export_matches_pytorch() {
    let ex = expected();
    let model = load_model(&fixture_dir().join("model.onnx")).unwrap();
    let (last, pooled) = run(&model, &ex, None, true);
    assert!(max_abs_diff(&last, &ex.last_hidden_state) <= 1e-5);
    assert!(max_abs_diff(&pooled, &ex.pooler_output) <= 1e-5);
}

/// Fed `W[ids]`, the edited graph computes exactly what the original computes from the ids.
#[test]
fn edited_encoder_reproduces_the_original() {
    let ex = expected();
    let original = load_model(&fixture_dir().join("model.onnx")).unwrap();
    let (want_last, want_pooled) = run(&original, &ex, None, true);
    let edited = expose_token_embeddings(original.clone(), &fixture_dir()).unwrap();
    assert_eq!(edited.table.name, "model.embeddings.token_embedding.weight");
    assert_eq!(
        (edited.table.vocab_size, edited.table.hidden_size),
        (1000, ex.hidden)
    );
    // CLIP's pooled output still reads the ids (position of the end-of-text token).
    assert!(edited.keeps_input_ids);
    // The table is no longer in the graph.
    let graph = edited.model.graph.as_ref().unwrap();
    assert!(
        graph
            .initializer
            .iter()
            .all(|t| t.name() != edited.table.name)
    );
    assert!(encode_model(&edited.model).len() + 100_000 < encode_model(&original).len());

    let embeds = lookup(&edited.table.data, ex.hidden, &ex.ids);
    let (last, pooled) = run(&edited.model, &ex, Some(embeds), true);
    assert_eq!(max_abs_diff(&last, &want_last), 0.0);
    assert_eq!(max_abs_diff(&pooled, &want_pooled), 0.0);
}

/// Injecting `v` at the anchor token's positions equals what the official code does: overwrite that row of
/// the token table in the original model and run it on the ids.
#[test]
fn injection_equals_overwriting_the_table_row() {
    let ex = expected();
    let anchor = ex.ids[2]; // a class-word token in the first prompt
    let original = load_model(&fixture_dir().join("model.onnx")).unwrap();
    let edited = expose_token_embeddings(original.clone(), &fixture_dir()).unwrap();
    let v: Vec<f32> = (0..ex.hidden)
        .map(|i| ((i as f32) * 0.37).sin() * 0.4)
        .collect();

    let mut embeds = lookup(&edited.table.data, ex.hidden, &ex.ids);
    for (pos, &id) in ex.ids.iter().enumerate() {
        if id == anchor {
            embeds[pos * ex.hidden..(pos + 1) * ex.hidden].copy_from_slice(&v);
        }
    }
    let (last, pooled) = run(&edited.model, &ex, Some(embeds), true);

    let mut overwritten = original.clone();
    let table = overwritten
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name() == edited.table.name)
        .unwrap();
    let mut data = tensor_f32(table, &fixture_dir()).unwrap();
    data[anchor as usize * ex.hidden..(anchor as usize + 1) * ex.hidden].copy_from_slice(&v);
    table.raw_data = Some(data.iter().flat_map(|x| x.to_le_bytes()).collect());
    table.float_data.clear();
    let (want_last, want_pooled) = run(&overwritten, &ex, None, true);

    assert!(
        max_abs_diff(&last, &want_last) <= 1e-6,
        "{}",
        max_abs_diff(&last, &want_last)
    );
    assert!(max_abs_diff(&pooled, &want_pooled) <= 1e-6);
    // And the injection changed something (the check above is not vacuous).
    assert!(max_abs_diff(&last, &ex.last_hidden_state) > 1e-3);
}

#[test]
fn a_model_without_input_ids_is_rejected_by_name() {
    let mut model = load_model(&fixture_dir().join("model.onnx")).unwrap();
    let graph = model.graph.as_mut().unwrap();
    for input in &mut graph.input {
        input.name = Some("tokens".to_owned());
    }
    let err = expose_token_embeddings(model, &fixture_dir())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "text encoder: has no input `input_ids` (inputs: [\"tokens\"])"
    );
}
