//! The SD text encoder with embedding injection (SPEC §3.1 step 4).
//!
//! The export's token lookup is turned into the input `inputs_embeds` by [`crate::onnx::text_encoder`]; this
//! wrapper looks the rows up itself and puts the outlier vector `v` at every position holding the class's
//! anchor token, which equals the official code's overwrite of that row of the token table.

use std::path::Path;

use ndarray::{Array3, ArrayD};
use ort::session::Session;

use super::session::{
    InputSpec, SessionOptions, float_input, float_output, ids_input, input_spec, open_session,
    open_session_from_memory, require_output,
};
use super::te_cache::{Edited, edited_text_encoder};
use crate::error::{Error, Result};
use crate::onnx::text_encoder::{INPUT_IDS, INPUTS_EMBEDS, TokenTable};

/// What to put in place of one prompt's anchor token.
#[derive(Debug, Clone, Copy)]
pub struct Injection<'a> {
    /// The anchor token id (first BPE token of the class's embedding word).
    pub token: u32,
    /// The vector replacing its embedding; its length is the encoder's hidden size.
    pub vector: &'a [f32],
}

/// A loaded text encoder.
pub struct TextEncoder {
    session: Session,
    table: TokenTable,
    embeds: InputSpec,
    ids: Option<InputSpec>,
    what: String,
}

impl TextEncoder {
    /// Loads `path` (an SD export's `text_encoder/model.onnx`) with its token lookup turned into the
    /// `inputs_embeds` input, from the edit cache of `opts` when it holds this export ([`super::te_cache`]).
    pub fn load(path: &Path, opts: &SessionOptions) -> Result<TextEncoder> {
        let what = path.display().to_string();
        let edited =
            edited_text_encoder(path, opts.text_encoder_cache.as_deref()).map_err(|e| match e {
                Error::Onnx { msg, .. } => Error::Onnx {
                    what: what.clone(),
                    msg,
                },
                other => other,
            })?;
        let (session, table, keeps_input_ids) = match edited {
            Edited::File {
                path: cached,
                table,
                keeps_input_ids,
            } => (open_session(&cached, opts)?, table, keeps_input_ids),
            Edited::Bytes {
                bytes,
                table,
                keeps_input_ids,
            } => (
                open_session_from_memory(&bytes, &what, opts)?,
                table,
                keeps_input_ids,
            ),
        };
        let embeds = input_spec(&session, &what, INPUTS_EMBEDS)?;
        let ids = if keeps_input_ids {
            Some(input_spec(&session, &what, INPUT_IDS)?)
        } else {
            None
        };
        require_output(&session, &what, "last_hidden_state")?;
        Ok(TextEncoder {
            session,
            table,
            embeds,
            ids,
            what,
        })
    }

    /// Width of the token embeddings and of `last_hidden_state`.
    pub fn hidden_size(&self) -> usize {
        self.table.hidden_size
    }

    /// The token-embedding table (stage 1 reads the class rows from it).
    pub fn token_table(&self) -> &TokenTable {
        &self.table
    }

    /// `last_hidden_state` `[batch, 77, hidden]` for `ids` (one row of 77 ids per prompt), with each prompt's
    /// injection applied at every position of its anchor token.
    pub fn encode(
        &mut self,
        ids: &[Vec<u32>],
        injections: &[Option<Injection<'_>>],
    ) -> Result<ArrayD<f32>> {
        let (batch, seq, hidden) = (
            ids.len(),
            ids.first().map_or(0, Vec::len),
            self.table.hidden_size,
        );
        if injections.len() != batch {
            return Err(Error::Shape {
                what: format!("{}: injections", self.what),
                expected: format!("{batch} (one per prompt)"),
                got: injections.len().to_string(),
            });
        }
        let mut embeds = Array3::<f32>::zeros((batch, seq, hidden)); // [B, 77, hidden]
        for (b, (row_ids, injection)) in ids.iter().zip(injections).enumerate() {
            if let Some(inj) = injection
                && inj.vector.len() != hidden
            {
                return Err(Error::Shape {
                    what: format!("{}: injected embedding", self.what),
                    expected: format!("{hidden} values (the text encoder's hidden size)"),
                    got: inj.vector.len().to_string(),
                });
            }
            for (p, &id) in row_ids.iter().enumerate() {
                let row = match injection {
                    Some(inj) if inj.token == id => inj.vector,
                    _ => self
                        .table
                        .row(id as usize)
                        .ok_or_else(|| Error::InvalidValue {
                            key: "token id".to_owned(),
                            msg: format!(
                                "{id} is outside the vocabulary of {} tokens",
                                self.table.vocab_size
                            ),
                        })?,
                };
                embeds
                    .slice_mut(ndarray::s![b, p, ..])
                    .assign(&ndarray::ArrayView1::from(row));
            }
        }
        let mut inputs = vec![(
            INPUTS_EMBEDS.to_owned(),
            float_input(embeds.into_dyn(), self.embeds.elem, &self.what)?,
        )];
        if let Some(spec) = self.ids {
            inputs.push((INPUT_IDS.to_owned(), ids_input(ids, spec.elem, &self.what)?));
        }
        let outputs = self
            .session
            .run(inputs)
            .map_err(|e| Error::ort(self.what.clone(), e))?;
        float_output(&outputs, "last_hidden_state", &self.what)
    }
}
