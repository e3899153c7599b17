//! The class token embeddings T `[C, D]` that stage 1 aligns the encoder to (SPEC §1.1).
//!
//! Row c is the text encoder's input word embedding of the anchor token of class c: the first BPE token
//! after BOS of the class's `embedding_word` tokenised alone. Stage 3 puts the outlier vector exactly where
//! that token sits in the prompt, so T, the feature bank built around it and the injection all live in the
//! same space. The table is read from the export's `text_encoder/model.onnx` (the initializer the
//! `Gather` of `input_ids` reads), the tokenizer from its `tokenizer/` folder.

use std::path::Path;

use ndarray::Array2;

use crate::diffusion::classes::Classes;
use crate::diffusion::model_dir::SdModelDir;
use crate::diffusion::tokenizer::ClipTokenizer;
use crate::error::{Error, Result};
use crate::onnx::model::load_model;
use crate::onnx::text_encoder::expose_token_embeddings;

/// The token embeddings of `classes` from the SD export at `sd_dir`, with the anchor ids.
pub fn from_sd_model(sd_dir: &Path, classes: &Classes) -> Result<(Array2<f32>, Vec<u32>)> {
    let dir = SdModelDir::open(sd_dir)?;
    let tokenizer = ClipTokenizer::from_dir(&dir.tokenizer)?;
    let model_dir = dir.text_encoder.parent().unwrap_or(sd_dir);
    let table = expose_token_embeddings(load_model(&dir.text_encoder)?, model_dir)?.table;
    let mut out = Array2::<f32>::zeros((classes.len(), table.hidden_size));
    let mut anchors = Vec::with_capacity(classes.len());
    for (c, class) in classes.classes.iter().enumerate() {
        let id = tokenizer.anchor_token(&class.embedding_word)?;
        let row = table.row(id as usize).ok_or_else(|| Error::Onnx {
            what: dir.text_encoder.display().to_string(),
            msg: format!(
                "token id {id} of {:?} is outside the token table ({} rows)",
                class.embedding_word, table.vocab_size
            ),
        })?;
        out.row_mut(c).assign(&ndarray::ArrayView1::from(row));
        anchors.push(id);
    }
    Ok((out, anchors))
}
