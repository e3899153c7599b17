//! Binary-only helpers: logging setup and progress drawing. The library never sees these.

pub mod logging;
pub mod progress;
pub mod train;
