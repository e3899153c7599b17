//! A cache of edited text encoders, keyed by the sha256 of the original.
//!
//! Why: exposing the token lookup (`onnx::text_encoder`) means parsing the whole export (490 MB for SD 1.x)
//! and serialising it again, at every start of every worker. The cache keeps the edited graph as a file,
//! which ONNX Runtime opens directly, and the token table as `.npy`. The key is the sha256 of every file
//! in the text encoder's folder except `config.json`, plus [`EDIT_VERSION`], so an edited or replaced
//! export never meets a stale entry.
//!
//! Layout: `<root>/text-encoder/<key>/{model.onnx, token_table.npy, meta.json}`; an entry is written in a
//! temporary folder and renamed into place, so a reader sees a whole entry or none. `meta.json` is written
//! last inside it and marks the entry complete. The root is `$DREAM_OOD_CACHE`, else
//! `$XDG_CACHE_HOME/dream-ood`, else `~/.cache/dream-ood`; `DREAM_OOD_CACHE=off` disables the cache.
//! Exports whose weights live in external data files are not cached (the edited graph would need them
//! beside it); they are edited in memory as before.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use ndarray::Array2;
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::onnx::model::{encode_model, load_model};
use crate::onnx::text_encoder::{EmbeddingInputModel, TokenTable, expose_token_embeddings};

/// Bumped whenever the edit changes, so that old entries are not reused.
pub const EDIT_VERSION: u32 = 1;

/// The default cache root from the environment (see the module doc); `None` when disabled or unknown.
pub fn default_root() -> Option<PathBuf> {
    match std::env::var_os("DREAM_OOD_CACHE") {
        Some(v) if v == "off" || v == "0" || v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|p| p.join("dream-ood")),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Meta {
    edit_version: u32,
    source: String,
    table_name: String,
    float16: bool,
    keeps_input_ids: bool,
}

/// What a loader needs: the edited graph (as a file or as bytes) and the table.
pub enum Edited {
    /// From the cache (or just written to it): open the session from this file.
    File {
        path: PathBuf,
        table: TokenTable,
        keeps_input_ids: bool,
    },
    /// Not cached: the serialised edited model.
    Bytes {
        bytes: Vec<u8>,
        table: TokenTable,
        keeps_input_ids: bool,
    },
}

/// [`folder_key`] remembered per folder for this process, so that the workers of one job (each loading
/// its own sessions) hash a 490 MB export once, not once each. Keyed by the files' names, sizes and
/// modification times, so an export replaced mid-process is hashed again. The TensorRT engine folders
/// ([`super::tensorrt`]) are keyed by it too.
pub(crate) fn memo_key(dir: &Path) -> Result<String> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static MEMO: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let mut stamp = format!("{}\n", dir.display());
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let meta = e.metadata().map_err(|err| Error::io(e.path(), err))?;
        stamp.push_str(&format!(
            "{:?} {} {:?}\n",
            e.file_name(),
            meta.len(),
            meta.modified().ok()
        ));
    }
    let memo = MEMO.get_or_init(Default::default);
    if let Some(key) = memo.lock().unwrap_or_else(|p| p.into_inner()).get(&stamp) {
        return Ok(key.clone());
    }
    let key = folder_key(dir)?;
    memo.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(stamp, key.clone());
    Ok(key)
}

/// sha256 over the folder's files (sorted by name, `config.json` left out), with names and lengths.
fn folder_key(dir: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "config.json"))
        .collect();
    files.sort();
    let mut h = Sha256::new();
    h.update(format!("dream-ood text-encoder edit v{EDIT_VERSION}\n").as_bytes());
    let mut buf = vec![0u8; 1 << 20];
    for f in &files {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
        let len = f.metadata().map_err(|e| Error::io(f, e))?.len();
        h.update(format!("{}\n{len}\n", name.unwrap_or_default()).as_bytes());
        let mut file = File::open(f).map_err(|e| Error::io(f, e))?;
        loop {
            let n = file.read(&mut buf).map_err(|e| Error::io(f, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Whether a model keeps any initializer in an external file.
fn uses_external_data(model: &crate::onnx::proto::ModelProto) -> bool {
    model.graph.as_ref().is_some_and(|g| {
        g.initializer
            .iter()
            .any(|t| t.data_location() == crate::onnx::proto::tensor_proto::DataLocation::External)
    })
}

fn read_entry(entry: &Path) -> Result<(Meta, TokenTable)> {
    let meta_path = entry.join("meta.json");
    let meta: Meta =
        serde_json::from_slice(&std::fs::read(&meta_path).map_err(|e| Error::io(&meta_path, e))?)
            .map_err(|e| Error::Data {
            path: meta_path.clone(),
            line: None,
            msg: format!("unreadable cache entry: {e}"),
        })?;
    if meta.edit_version != EDIT_VERSION {
        return Err(Error::Data {
            path: meta_path,
            line: None,
            msg: "cache entry of another edit version".into(),
        });
    }
    let table_path = entry.join("token_table.npy");
    let file = File::open(&table_path).map_err(|e| Error::io(&table_path, e))?;
    let table = Array2::<f32>::read_npy(file).map_err(|e| Error::Data {
        path: table_path.clone(),
        line: None,
        msg: format!("unreadable token table: {e}"),
    })?;
    let (vocab_size, hidden_size) = table.dim();
    Ok((
        meta.clone(),
        TokenTable {
            name: meta.table_name,
            vocab_size,
            hidden_size,
            data: table.into_raw_vec_and_offset().0,
            float16: meta.float16,
        },
    ))
}

fn write_entry(
    entry: &Path,
    source: &Path,
    edited: &EmbeddingInputModel,
    bytes: &[u8],
) -> Result<()> {
    let parent = entry.parent().expect("entries live under the root");
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        entry
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = (|| {
        std::fs::write(tmp.join("model.onnx"), bytes)
            .map_err(|e| Error::io(tmp.join("model.onnx"), e))?;
        let t = &edited.table;
        let table = Array2::from_shape_vec((t.vocab_size, t.hidden_size), t.data.clone())
            .expect("the table's length is vocab × hidden");
        let npy = tmp.join("token_table.npy");
        let f = File::create(&npy).map_err(|e| Error::io(&npy, e))?;
        table
            .write_npy(std::io::BufWriter::new(f))
            .map_err(|e| Error::Data {
                path: npy.clone(),
                line: None,
                msg: format!("cannot write: {e}"),
            })?;
        let meta = Meta {
            edit_version: EDIT_VERSION,
            source: source.display().to_string(),
            table_name: t.name.clone(),
            float16: t.float16,
            keeps_input_ids: edited.keeps_input_ids,
        };
        let json = serde_json::to_vec_pretty(&meta).expect("plain data");
        std::fs::write(tmp.join("meta.json"), json)
            .map_err(|e| Error::io(tmp.join("meta.json"), e))?;
        // Another process may have finished the same entry first: theirs is as good as ours.
        if entry.join("meta.json").exists() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Ok(());
        }
        let _ = std::fs::remove_dir_all(entry);
        std::fs::rename(&tmp, entry).map_err(|e| Error::io(entry, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// The edited text encoder at `path` (a `text_encoder/model.onnx`), from the cache under `root` when
/// there, else edited now (and cached when `root` is given and the export keeps its weights inline).
/// A broken entry is reported at `warn`, rebuilt, and never fatal; a cache that cannot be written only
/// costs the next start its time.
pub fn edited_text_encoder(path: &Path, root: Option<&Path>) -> Result<Edited> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let entry = match root {
        Some(root) => {
            let key = memo_key(dir)?;
            Some(root.join("text-encoder").join(key))
        }
        None => None,
    };
    if let Some(entry) = &entry
        && entry.join("meta.json").exists()
    {
        match read_entry(entry) {
            Ok((meta, table)) => {
                tracing::debug!("text encoder edit from the cache {}", entry.display());
                return Ok(Edited::File {
                    path: entry.join("model.onnx"),
                    table,
                    keeps_input_ids: meta.keeps_input_ids,
                });
            }
            Err(e) => {
                tracing::warn!(
                    "rebuilding the broken cached text encoder {}: {e}",
                    entry.display()
                );
                let _ = std::fs::remove_dir_all(entry);
            }
        }
    }
    let edited = expose_token_embeddings(load_model(path)?, dir)?;
    let bytes = encode_model(&edited.model);
    if let Some(entry) = &entry {
        if uses_external_data(&edited.model) {
            tracing::debug!(
                "{}: weights in external data, edit not cached",
                path.display()
            );
        } else {
            match write_entry(entry, path, &edited, &bytes) {
                Ok(()) => {
                    tracing::info!("cached the edited text encoder in {}", entry.display());
                    return Ok(Edited::File {
                        path: entry.join("model.onnx"),
                        table: edited.table,
                        keeps_input_ids: edited.keeps_input_ids,
                    });
                }
                Err(e) => tracing::warn!("could not cache the edited text encoder: {e}"),
            }
        }
    }
    Ok(Edited::Bytes {
        bytes,
        table: edited.table,
        keeps_input_ids: edited.keeps_input_ids,
    })
}
