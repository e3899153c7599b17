//! Binary-only helpers: logging setup and progress drawing. The library never sees these.

pub mod latent;
pub mod logging;
pub mod progress;
pub mod run;
