//! Architecture descriptions of the networks in `src/nn/`, free of libtorch so that the ONNX exporter
//! (`src/onnx/`) can read them too.

use std::str::FromStr;

/// Which ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Depth {
    Resnet18,
    Resnet34,
    Resnet50,
}

impl Depth {
    /// Blocks per stage and whether they are bottlenecks.
    pub fn layout(self) -> ([usize; 4], bool) {
        match self {
            Depth::Resnet18 => ([2, 2, 2, 2], false),
            Depth::Resnet34 => ([3, 4, 6, 3], false),
            Depth::Resnet50 => ([3, 4, 6, 3], true),
        }
    }

    /// Width of the penultimate features for a given [`ResNetConfig::width`]: 8 × width (basic blocks;
    /// 512 at the standard 64) or 32 × width (bottlenecks; 2048).
    pub fn feature_dim(self, width: i64) -> i64 {
        if self.layout().1 {
            32 * width
        } else {
            8 * width
        }
    }
}

impl FromStr for Depth {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "resnet18" => Ok(Depth::Resnet18),
            "resnet34" => Ok(Depth::Resnet34),
            "resnet50" => Ok(Depth::Resnet50),
            _ => Err(format!(
                "unknown network \"{s}\"; expected resnet18, resnet34 or resnet50"
            )),
        }
    }
}

/// The first layers, which set the resolution the stages see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stem {
    /// 3×3 conv, stride 1, no max-pool (small images; the official Dream-OOD models at every size).
    Cifar,
    /// 7×7 conv, stride 2, 3×3 max-pool, stride 2.
    Imagenet,
}

impl FromStr for Stem {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cifar" => Ok(Stem::Cifar),
            "imagenet" => Ok(Stem::Imagenet),
            _ => Err(format!("unknown stem \"{s}\"; expected cifar or imagenet")),
        }
    }
}

/// A ResNet backbone's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResNetConfig {
    pub depth: Depth,
    pub stem: Stem,
    /// Input channels (3; gray images are repeated to 3 by the data loader).
    pub in_channels: i64,
    /// Channels of the stem and the first stage; the later stages double it (2×, 4×, 8×). The standard
    /// ResNets (and every official Dream-OOD model) use [`STANDARD_WIDTH`]; a narrower network trades
    /// accuracy for speed on small images and CPUs (the embedded demo uses 16).
    pub width: i64,
}

/// The ResNet paper's width: 64 channels in the first stage, 512 (or 2048) penultimate features.
pub const STANDARD_WIDTH: i64 = 64;

/// Serde default of a `width` field, so that files written before the field existed read as standard.
pub fn standard_width() -> i64 {
    STANDARD_WIDTH
}

impl ResNetConfig {
    /// Output channels of stage `i` (0-based) before the bottleneck expansion.
    pub fn planes(&self, stage: usize) -> i64 {
        self.width << stage
    }
}
