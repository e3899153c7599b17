//! ResNet-18/34/50 (He et al. 2016, "Deep Residual Learning for Image Recognition") with the CIFAR stem
//! or the ImageNet stem, named exactly like PyTorch modules so that checkpoints move both ways.
//!
//! Names follow the official Dream-OOD networks (`scripts/resnet.py`, `scripts/resnet_anchor.py`), which
//! the released checkpoints use: the backbone is `encoder.*` (`encoder.conv1`, `encoder.bn1`,
//! `encoder.layer1.0.conv1`, …) and the projection shortcut is `shortcut.0` (1×1 conv) + `shortcut.1` (BN).
//! The head is a [`tch::nn::Linear`] named by the caller (`fc` for a classifier, `trans` for stage 1).
//!
//! - CIFAR stem: 3×3 conv, stride 1, no max-pool (SPEC §1.2; also used at 224×224 by the official
//!   ImageNet-100 models).
//! - ImageNet stem: 7×7 conv, stride 2, then 3×3 max-pool, stride 2 (torchvision's layout).
//!
//! Init as the official code (SPEC §1.2): convs kaiming-normal (fan_out, ReLU gain), BN weight 1 and bias 0,
//! Linear as PyTorch's default (kaiming-uniform with a = √5, bias U(±1/√fan_in)).

use tch::Tensor;
use tch::nn::{self, ModuleT};

pub use super::arch::{Depth, ResNetConfig, Stem};

/// Conv weights: kaiming-normal, fan_out, ReLU gain (official `resnet.py` init loop).
const CONV_INIT: nn::Init = nn::Init::Kaiming {
    dist: nn::init::NormalOrUniform::Normal,
    fan: nn::init::FanInOut::FanOut,
    non_linearity: nn::init::NonLinearity::ReLU,
};

fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding,
        bias: false,
        ws_init: CONV_INIT,
        ..Default::default()
    };
    nn::conv2d(p, c_in, c_out, k, cfg)
}

fn bn(p: nn::Path, c: i64) -> nn::BatchNorm {
    let cfg = nn::BatchNormConfig {
        ws_init: nn::Init::Const(1.0),
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    nn::batch_norm2d(p, c, cfg)
}

/// PyTorch's default `nn.Linear` init: kaiming-uniform with a = √5 (gain √(1/3)), bias U(±1/√fan_in).
pub fn linear(p: nn::Path, d_in: i64, d_out: i64) -> nn::Linear {
    let cfg = nn::LinearConfig {
        ws_init: nn::Init::Kaiming {
            dist: nn::init::NormalOrUniform::Uniform,
            fan: nn::init::FanInOut::FanIn,
            non_linearity: nn::init::NonLinearity::ExplicitGain((1.0f64 / 3.0).sqrt()),
        },
        bs_init: None,
        bias: true,
    };
    nn::linear(p, d_in, d_out, cfg)
}

/// The 1×1 conv + BN projection used when a block changes width or stride.
#[derive(Debug)]
struct Shortcut {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
}

impl Shortcut {
    fn maybe(p: &nn::Path, c_in: i64, c_out: i64, stride: i64) -> Option<Shortcut> {
        (stride != 1 || c_in != c_out).then(|| Shortcut {
            conv: conv(p / "shortcut" / "0", c_in, c_out, 1, stride, 0),
            bn: bn(p / "shortcut" / "1", c_out),
        })
    }

    fn apply(shortcut: &Option<Shortcut>, xs: &Tensor, train: bool) -> Tensor {
        match shortcut {
            Some(s) => xs.apply(&s.conv).apply_t(&s.bn, train),
            None => xs.shallow_clone(),
        }
    }
}

/// conv3×3-BN-ReLU-conv3×3-BN + shortcut, ReLU.
#[derive(Debug)]
struct BasicBlock {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    shortcut: Option<Shortcut>,
}

/// conv1×1-BN-ReLU-conv3×3(stride)-BN-ReLU-conv1×1(×4)-BN + shortcut, ReLU.
#[derive(Debug)]
struct Bottleneck {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    conv3: nn::Conv2D,
    bn3: nn::BatchNorm,
    shortcut: Option<Shortcut>,
}

#[derive(Debug)]
enum Block {
    Basic(Box<BasicBlock>),
    Bottleneck(Box<Bottleneck>),
}

impl Block {
    fn new(p: &nn::Path, bottleneck: bool, c_in: i64, planes: i64, stride: i64) -> Block {
        if bottleneck {
            let c_out = planes * 4;
            Block::Bottleneck(Box::new(Bottleneck {
                conv1: conv(p / "conv1", c_in, planes, 1, 1, 0),
                bn1: bn(p / "bn1", planes),
                conv2: conv(p / "conv2", planes, planes, 3, stride, 1),
                bn2: bn(p / "bn2", planes),
                conv3: conv(p / "conv3", planes, c_out, 1, 1, 0),
                bn3: bn(p / "bn3", c_out),
                shortcut: Shortcut::maybe(p, c_in, c_out, stride),
            }))
        } else {
            Block::Basic(Box::new(BasicBlock {
                conv1: conv(p / "conv1", c_in, planes, 3, stride, 1),
                bn1: bn(p / "bn1", planes),
                conv2: conv(p / "conv2", planes, planes, 3, 1, 1),
                bn2: bn(p / "bn2", planes),
                shortcut: Shortcut::maybe(p, c_in, planes, stride),
            }))
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Block::Basic(b) => {
                let out = xs.apply(&b.conv1).apply_t(&b.bn1, train).relu();
                let out = out.apply(&b.conv2).apply_t(&b.bn2, train);
                (out + Shortcut::apply(&b.shortcut, xs, train)).relu()
            }
            Block::Bottleneck(b) => {
                let out = xs.apply(&b.conv1).apply_t(&b.bn1, train).relu();
                let out = out.apply(&b.conv2).apply_t(&b.bn2, train).relu();
                let out = out.apply(&b.conv3).apply_t(&b.bn3, train);
                (out + Shortcut::apply(&b.shortcut, xs, train)).relu()
            }
        }
    }
}

/// A ResNet backbone: image `[B, C, H, W]` → penultimate features `[B, feature_dim]`.
#[derive(Debug)]
pub struct ResNet {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    stages: Vec<Vec<Block>>,
    stem: Stem,
    feature_dim: i64,
}

impl ResNet {
    /// Builds the backbone under `p` (callers pass `root / "encoder"` for the official names).
    pub fn new(p: &nn::Path, cfg: &ResNetConfig) -> ResNet {
        let (blocks, bottleneck) = cfg.depth.layout();
        let w = cfg.width;
        let conv1 = match cfg.stem {
            Stem::Cifar => conv(p / "conv1", cfg.in_channels, w, 3, 1, 1),
            Stem::Imagenet => conv(p / "conv1", cfg.in_channels, w, 7, 2, 3),
        };
        let mut c_in = w;
        let mut stages = Vec::with_capacity(4);
        for (i, &n) in blocks.iter().enumerate() {
            let (planes, stride) = (cfg.planes(i), if i == 0 { 1 } else { 2 });
            let layer = p / format!("layer{}", i + 1);
            let mut stage = Vec::with_capacity(n);
            for j in 0..n {
                let s = if j == 0 { stride } else { 1 };
                stage.push(Block::new(&(&layer / j), bottleneck, c_in, planes, s));
                c_in = if bottleneck { planes * 4 } else { planes };
            }
            stages.push(stage);
        }
        ResNet {
            conv1,
            bn1: bn(p / "bn1", w),
            stages,
            stem: cfg.stem,
            feature_dim: c_in,
        }
    }

    /// Width of [`ResNet::features`].
    pub fn feature_dim(&self) -> i64 {
        self.feature_dim
    }

    /// Penultimate features after global average pooling: `[B, C, H, W]` → `[B, feature_dim]`.
    pub fn features(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut out = xs.apply(&self.conv1).apply_t(&self.bn1, train).relu();
        if self.stem == Stem::Imagenet {
            out = out.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for stage in &self.stages {
            for block in stage {
                out = block.forward_t(&out, train);
            }
        }
        out.adaptive_avg_pool2d([1, 1]).flatten(1, -1) // [B, feature_dim]
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.features(xs, train)
    }
}

/// Backbone + linear head: the official `ResNet_Model` (`encoder` + `fc`), or the stage-1 encoder
/// (`encoder` + `trans`, 512 → 768).
#[derive(Debug)]
pub struct ResNetWithHead {
    pub encoder: ResNet,
    pub head: nn::Linear,
}

impl ResNetWithHead {
    /// `encoder.*` and `<head_name>.*` under `root`.
    pub fn new(
        root: &nn::Path,
        cfg: &ResNetConfig,
        head_name: &str,
        out_dim: i64,
    ) -> ResNetWithHead {
        let encoder = ResNet::new(&(root / "encoder"), cfg);
        let head = linear(root / head_name, encoder.feature_dim(), out_dim);
        ResNetWithHead { encoder, head }
    }

    /// Penultimate features `[B, feature_dim]`.
    pub fn features(&self, xs: &Tensor, train: bool) -> Tensor {
        self.encoder.features(xs, train)
    }

    /// The head applied to features: `[B, feature_dim]` → `[B, out_dim]`.
    pub fn head(&self, features: &Tensor) -> Tensor {
        features.apply(&self.head)
    }
}

impl ModuleT for ResNetWithHead {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.head(&self.features(xs, train))
    }
}
