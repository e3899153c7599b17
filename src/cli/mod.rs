//! Binary-only helpers: logging setup, progress drawing, and the flags of the subcommands that keep them
//! out of main.rs. The library never sees these.

pub mod eval;
pub mod export;
pub mod interrupt;
pub mod latent;
pub mod logging;
pub mod progress;
pub mod run;
pub mod score;
pub mod serve;
pub mod train;
