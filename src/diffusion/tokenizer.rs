//! The CLIP tokenizer of a Stable Diffusion export, built with the `tokenizers` crate.
//!
//! SD exports ship `tokenizer/vocab.json` + `merges.txt` (the slow `CLIPTokenizer` files), rarely a
//! `tokenizer.json`. The pipeline below is transformers' fast CLIP tokenizer (`CLIPConverter`):
//! NFC → whitespace runs to one space → lowercase; split on CLIP's regex; byte-level mapping; BPE with the
//! `</w>` end-of-word suffix; `[BOS] ids [EOS]`; truncate to 77 keeping EOS; pad to 77 with the pad token
//! (`<|endoftext|>` for SD 1.x, `!` for SD 2.x, from `special_tokens_map.json`). It differs from the slow
//! tokenizer only where ftfy would repair mojibake or HTML entities.

use std::path::Path;

use serde::Deserialize;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    NormalizerWrapper, PaddingParams, PaddingStrategy, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer, TruncationParams,
};

use crate::error::{Error, Result};

/// CLIP's context length.
pub const MAX_LENGTH: usize = 77;
/// CLIP's pre-tokenisation pattern (transformers `CLIPConverter`).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A CLIP tokenizer producing the 77 ids a text encoder takes.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
}

#[derive(Deserialize, Default)]
struct SpecialTokens {
    #[serde(default)]
    pad_token: Option<TokenField>,
}

/// `special_tokens_map.json` writes a token either as a string or as `{"content": "..."}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenField {
    Plain(String),
    Object { content: String },
}

impl ClipTokenizer {
    /// Loads `dir/tokenizer.json` if present, else builds the tokenizer from `dir/vocab.json`, `dir/merges.txt`
    /// and `dir/special_tokens_map.json`.
    pub fn from_dir(dir: &Path) -> Result<ClipTokenizer> {
        let what = |msg: String| Error::Onnx {
            what: dir.display().to_string(),
            msg,
        };
        let json = dir.join("tokenizer.json");
        let mut tokenizer = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| what(format!("tokenizer.json: {e}")))?
        } else {
            Self::build_from_vocab(dir)?
        };
        let id = |token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                what(format!(
                    "the vocabulary has no `{token}` token; is this a CLIP tokenizer?"
                ))
            })
        };
        let (bos_id, eos_id) = (id("<|startoftext|>")?, id("<|endoftext|>")?);
        let pad_token = Self::pad_token(dir)?;
        let pad_id = id(&pad_token)?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_LENGTH,
                ..Default::default()
            }))
            .map_err(|e| what(format!("truncation: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(MAX_LENGTH),
            pad_id,
            pad_token,
            ..Default::default()
        }));
        Ok(ClipTokenizer {
            tokenizer,
            bos_id,
            eos_id,
        })
    }

    fn build_from_vocab(dir: &Path) -> Result<Tokenizer> {
        let what = |msg: String| Error::Onnx {
            what: dir.display().to_string(),
            msg,
        };
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        for path in [&vocab, &merges] {
            if !path.is_file() {
                return Err(what(format!(
                    "no tokenizer.json and no {}: an SD export's tokenizer/ folder holds vocab.json and merges.txt",
                    path.file_name().unwrap_or_default().to_string_lossy()
                )));
            }
        }
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .end_of_word_suffix("</w>".to_owned())
            .continuing_subword_prefix(String::new())
            .unk_token("<|endoftext|>".to_owned())
            .fuse_unk(false)
            .build()
            .map_err(|e| what(format!("vocab.json/merges.txt: {e}")))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let whitespace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| what(format!("normalizer: {e}")))?;
        tokenizer.with_normalizer(Some(tokenizers::normalizers::Sequence::new(vec![
            NormalizerWrapper::NFC(NFC),
            NormalizerWrapper::Replace(whitespace),
            NormalizerWrapper::Lowercase(Lowercase),
        ])));
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| what(format!("pre-tokenizer: {e}")))?;
        tokenizer.with_pre_tokenizer(Some(PreSequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ])));
        let eos = tokenizer.token_to_id("<|endoftext|>");
        let bos = tokenizer.token_to_id("<|startoftext|>");
        let (Some(eos), Some(bos)) = (eos, bos) else {
            return Err(what(
                "vocab.json has no <|startoftext|> / <|endoftext|>".to_owned(),
            ));
        };
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new(
                ("<|endoftext|>".into(), eos),
                ("<|startoftext|>".into(), bos),
            )
            .trim_offsets(false)
            .add_prefix_space(false),
        ));
        Ok(tokenizer)
    }

    /// The pad token from `special_tokens_map.json` (SD 1.x: `<|endoftext|>`; SD 2.x: `!`).
    fn pad_token(dir: &Path) -> Result<String> {
        let path = dir.join("special_tokens_map.json");
        if !path.is_file() {
            return Ok("<|endoftext|>".to_owned());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let map: SpecialTokens = serde_json::from_str(&text).map_err(|e| Error::Onnx {
            what: path.display().to_string(),
            msg: e.to_string(),
        })?;
        Ok(match map.pad_token {
            Some(TokenField::Plain(s)) | Some(TokenField::Object { content: s }) => s,
            None => "<|endoftext|>".to_owned(),
        })
    }

    /// The 77 ids of `text`: BOS, the BPE ids (at most 75), EOS, padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::InvalidValue {
                key: "prompt".to_owned(),
                msg: format!("{text:?} cannot be tokenized: {e}"),
            })?;
        // Truncation leaves room for BOS and EOS (BOS + at most 75 ids + EOS), as transformers does.
        Ok(encoding.get_ids().to_vec())
    }

    /// The anchor token of a word: the first BPE token after BOS of the word tokenized alone (SPEC §1.1).
    pub fn anchor_token(&self, word: &str) -> Result<u32> {
        let ids = self.encode(word)?;
        match ids.get(1) {
            Some(&id) if id != self.eos_id => Ok(id),
            _ => Err(Error::InvalidValue {
                key: "embedding_word".to_owned(),
                msg: format!("{word:?} gives no token"),
            }),
        }
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
}
