//! libtorch networks shared by the stages: the stage-1 encoder, the stage-4 detector and the exporter all
//! build their ResNets here, so a checkpoint written by one loads in the others (and in PyTorch).

pub mod arch;
pub mod checkpoint;
pub mod optim;
pub mod resnet;
pub mod training;
pub mod weights;

pub use checkpoint::{CheckpointInfo, NetworkSpec};
pub use resnet::{Depth, ResNet, ResNetConfig, ResNetWithHead, Stem};
