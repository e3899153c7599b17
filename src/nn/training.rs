//! What every training loop here shares: its files, epoch checkpoints with resume, and its log.
//!
//! A training folder holds:
//!
//! ```text
//! model.safetensors   the network after the last finished epoch (a checkpoint with CheckpointInfo)
//! state.safetensors   optimiser momentum + extra trainable tensors, with {"epoch", "step"} in metadata
//! log.jsonl, log.csv  one row per epoch (the same columns in both)
//! ```
//!
//! Resume rule: both files are written under temporary names, then renamed (state first, model second); each
//! records the epoch, and a folder is resumable when both agree. Data order and augmentation come from (seed, epoch) in the
//! loader and every other draw from (seed, step), so a resumed run continues the uninterrupted one.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;

use tch::{Tensor, nn};

use super::checkpoint::{self, CheckpointInfo};
use super::optim::Sgd;
use crate::error::{Error, Result};
use crate::files::{temp_path, write_atomic};

/// The files of one training run.
#[derive(Debug, Clone)]
pub struct TrainFiles {
    pub dir: PathBuf,
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// Finished epochs.
    pub epoch: u64,
    /// Optimiser steps taken.
    pub step: u64,
}

impl TrainFiles {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn model(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state.safetensors")
    }

    pub fn log_jsonl(&self) -> PathBuf {
        self.dir.join("log.jsonl")
    }

    pub fn log_csv(&self) -> PathBuf {
        self.dir.join("log.csv")
    }

    /// Saves the end of an epoch: the state (momentum, `extra` tensors such as a VOS feature queue, position)
    /// and then the model with `info.epoch = pos.epoch`.
    pub fn save_epoch(
        &self,
        vs: &nn::VarStore,
        info: &CheckpointInfo,
        opt: &Sgd,
        extra: Vec<(String, Tensor)>,
        pos: Position,
    ) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let mut tensors = opt.state();
        tensors.extend(extra);
        let meta = HashMap::from([
            ("epoch".to_owned(), pos.epoch.to_string()),
            ("step".to_owned(), pos.step.to_string()),
        ]);
        let mut info = info.clone();
        info.epoch = pos.epoch;
        // Both files are serialised and written under temporary names first, then renamed one right
        // after the other: a kill can split the pair only between two renames, not during a write.
        let (state, model) = (self.state(), self.model());
        let state_bytes = checkpoint::encode_tensors(&state, &tensors, meta)?;
        let model_bytes = checkpoint::encode(&model, vs, &info)?;
        let (state_tmp, model_tmp) = (temp_path(&state), temp_path(&model));
        std::fs::write(&state_tmp, &state_bytes).map_err(|e| Error::io(&state_tmp, e))?;
        std::fs::write(&model_tmp, &model_bytes).map_err(|e| Error::io(&model_tmp, e))?;
        std::fs::rename(&state_tmp, &state).map_err(|e| Error::io(&state, e))?;
        std::fs::rename(&model_tmp, &model).map_err(|e| Error::io(&model, e))
    }

    /// Loads the last finished epoch into `vs` and `opt` when the folder holds a consistent pair of files;
    /// returns the position and the state file's other tensors. `None` when there is nothing to resume.
    pub fn resume(
        &self,
        vs: &mut nn::VarStore,
        opt: &mut Sgd,
    ) -> Result<Option<(Position, BTreeMap<String, Tensor>)>> {
        let (model, state) = (self.model(), self.state());
        if !model.exists() || !state.exists() {
            return Ok(None);
        }
        let file = checkpoint::read_tensors(&state)?;
        let num = |key: &str| -> Result<u64> {
            file.metadata
                .get(key)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::Data {
                    path: state.clone(),
                    line: None,
                    msg: format!("metadata `{key}` is missing or not a number"),
                })
        };
        let pos = Position {
            epoch: num("epoch")?,
            step: num("step")?,
        };
        let info = checkpoint::load_into(&model, vs)?;
        let model_epoch = info.map(|i| i.epoch);
        if model_epoch != Some(pos.epoch) {
            return Err(Error::Data {
                path: model.clone(),
                line: None,
                msg: format!(
                    "is at epoch {model_epoch:?} but {} is at epoch {}; the run was cut between the two \
                     writes: delete both to restart",
                    state.display(),
                    pos.epoch
                ),
            });
        }
        opt.load_state(&file.tensors)?;
        Ok(Some((pos, file.tensors)))
    }
}

/// One row of a training log: named numbers, in insertion order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogRow(pub Vec<(String, f64)>);

impl LogRow {
    pub fn push(&mut self, key: &str, value: f64) -> &mut Self {
        self.0.push((key.to_owned(), value));
        self
    }
}

/// The JSONL + CSV epoch log. On resume, rows past the resumed epoch (an epoch that was logged but whose
/// checkpoint never landed) are dropped, so the log always matches the checkpoint.
pub struct TrainLog {
    files: TrainFiles,
    rows: Vec<LogRow>,
}

impl TrainLog {
    /// Opens the log of `files`, keeping the rows with `epoch <= keep_epochs`.
    pub fn open(files: &TrainFiles, keep_epochs: u64) -> Result<Self> {
        let mut rows = Vec::new();
        let path = files.log_jsonl();
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line)
                    .map_err(|e| Error::Data {
                        path: path.clone(),
                        line: Some(i + 1),
                        msg: format!("not a JSON object: {e}"),
                    })?;
                let row = LogRow(
                    map.into_iter()
                        .map(|(k, v)| (k, v.as_f64().unwrap_or(f64::NAN)))
                        .collect(),
                );
                let epoch = row.0.iter().find(|(k, _)| k == "epoch").map(|(_, v)| *v);
                if epoch.is_some_and(|e| e <= keep_epochs as f64) {
                    rows.push(row);
                }
            }
        }
        Ok(Self {
            files: files.clone(),
            rows,
        })
    }

    /// Appends a row and rewrites both files atomically (logs are small: one row per epoch).
    pub fn append(&mut self, row: LogRow) -> Result<()> {
        self.rows.push(row);
        let mut jsonl = Vec::new();
        for r in &self.rows {
            let map: serde_json::Map<String, serde_json::Value> =
                r.0.iter()
                    .map(|(k, v)| (k.clone(), json_number(*v)))
                    .collect();
            serde_json::to_writer(&mut jsonl, &map).expect("plain JSON");
            jsonl.push(b'\n');
        }
        let mut columns: Vec<&str> = Vec::new();
        for r in &self.rows {
            for (k, _) in &r.0 {
                if !columns.contains(&k.as_str()) {
                    columns.push(k);
                }
            }
        }
        let mut csv = Vec::new();
        writeln!(csv, "{}", columns.join(",")).expect("in memory");
        for r in &self.rows {
            let cells: Vec<String> = columns
                .iter()
                .map(|c| {
                    r.0.iter()
                        .find(|(k, _)| k == c)
                        .map_or(String::new(), |(_, v)| v.to_string())
                })
                .collect();
            writeln!(csv, "{}", cells.join(",")).expect("in memory");
        }
        write_atomic(&self.files.log_jsonl(), &jsonl)?;
        write_atomic(&self.files.log_csv(), &csv)
    }

    pub fn rows(&self) -> &[LogRow] {
        &self.rows
    }
}

fn json_number(v: f64) -> serde_json::Value {
    if v.fract() == 0.0 && v.abs() < 9e15 {
        serde_json::Value::from(v as i64)
    } else {
        serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number)
    }
}

/// Top-1 accuracy of `logits` `[B, C]` against `labels` `[B]`, without building a graph.
pub fn accuracy(logits: &Tensor, labels: &Tensor) -> f64 {
    tch::no_grad(|| {
        logits
            .argmax(-1, false)
            .eq_tensor(labels)
            .to_kind(tch::Kind::Double)
            .mean(tch::Kind::Double)
            .double_value(&[])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Pipeline;
    use crate::nn::checkpoint::NetworkSpec;
    use crate::nn::optim::SgdConfig;
    use crate::nn::{Depth, Stem};

    #[test]
    fn log_keeps_rows_up_to_the_resumed_epoch_and_writes_csv() {
        let dir = tempfile::tempdir().unwrap();
        let files = TrainFiles::new(dir.path());
        let mut log = TrainLog::open(&files, 0).unwrap();
        for e in 1..=3 {
            let mut row = LogRow::default();
            row.push("epoch", e as f64).push("loss", 1.0 / e as f64);
            log.append(row).unwrap();
        }
        let log = TrainLog::open(&files, 2).unwrap();
        assert_eq!(log.rows().len(), 2);
        let csv = std::fs::read_to_string(files.log_csv()).unwrap();
        assert!(csv.starts_with("epoch,loss\n1,1\n2,0.5\n3,"), "{csv}");
    }

    #[test]
    fn save_then_resume_restores_weights_momentum_and_position() {
        let dir = tempfile::tempdir().unwrap();
        let files = TrainFiles::new(dir.path().join("run"));
        let spec = NetworkSpec {
            depth: Depth::Resnet18,
            stem: Stem::Cifar,
            in_channels: 3,
            width: 64,
            head: "fc".into(),
            out_dim: 2,
        };
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let net = spec.build(&vs.root());
        let mut opt = Sgd::new(&vs, SgdConfig::default());
        let x = Tensor::arange(2 * 3 * 8 * 8, (tch::Kind::Float, tch::Device::Cpu))
            .sin()
            .view([2, 3, 8, 8]);
        let loss = tch::nn::ModuleT::forward_t(&net, &x, true).sum(tch::Kind::Float);
        opt.zero_grad();
        loss.backward();
        opt.step(0.01);
        let info = CheckpointInfo::new("detector", spec.clone(), vec![], Pipeline::cifar_test());
        let queue = Tensor::from_slice(&[1.0f32, 2.0]);
        files
            .save_epoch(
                &vs,
                &info,
                &opt,
                vec![("queue".into(), queue)],
                Position { epoch: 1, step: 1 },
            )
            .unwrap();

        let mut vs2 = nn::VarStore::new(tch::Device::Cpu);
        let _net2 = spec.build(&vs2.root());
        let mut opt2 = Sgd::new(&vs2, SgdConfig::default());
        let (pos, extra) = files.resume(&mut vs2, &mut opt2).unwrap().unwrap();
        assert_eq!(pos, Position { epoch: 1, step: 1 });
        assert_eq!(
            Vec::<f32>::try_from(&extra["queue"]).unwrap(),
            vec![1.0, 2.0]
        );
        let a: BTreeMap<_, _> = opt.state().into_iter().collect();
        let b: BTreeMap<_, _> = opt2.state().into_iter().collect();
        assert_eq!(a.len(), b.len());
        for (k, t) in &a {
            assert!(t.equal(&b[k]), "{k}");
        }
        // A model file from another epoch than the state is refused.
        let mut info3 = info.clone();
        info3.epoch = 5;
        checkpoint::save(&files.model(), &vs, &info3).unwrap();
        let err = files.resume(&mut vs2, &mut opt2).unwrap_err().to_string();
        assert!(err.contains("epoch"), "{err}");
    }
}
