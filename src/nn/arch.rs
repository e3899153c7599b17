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

    /// Width of the penultimate features: 512 (basic blocks) or 2048 (bottlenecks).
    pub fn feature_dim(self) -> i64 {
        if self.layout().1 { 2048 } else { 512 }
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
}
