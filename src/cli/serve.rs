//! `dream-ood serve`: an exported detector over HTTP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use dream_ood::deploy::Detector;
use dream_ood::deploy::serve::{ServeConfig, serve};
use dream_ood::diffusion::session::SessionOptions;

/// Flags of `serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The detector exported by `dream-ood export`.
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on (port 0: any free port; the URL is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Most images per ONNX Runtime run (concurrent requests are batched together).
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Longest wait, in milliseconds, for more requests to join a batch.
    #[arg(long, default_value_t = 5)]
    max_wait_ms: u64,
    /// Largest request body in bytes (413 above).
    #[arg(long, default_value_t = 20 << 20)]
    max_body_bytes: usize,
    /// Largest image in pixels (width × height, read from the header before decoding; 413 above).
    #[arg(long, default_value_t = 40_000_000)]
    max_pixels: u64,
    /// Longest time for one /v1/score request, in milliseconds (503 above).
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    /// Requests that may wait for the session (503 "busy" above).
    #[arg(long, default_value_t = 1024)]
    max_queue: usize,
    /// ONNX Runtime intra-op threads (0: ONNX Runtime's choice).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// Runs the server until SIGTERM or Ctrl-C.
pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.max_batch > 0, "--max-batch must be at least 1");
    let opts = SessionOptions {
        intra_threads: args.threads,
        ..Default::default()
    };
    let detector = Detector::open(&args.model, &opts)?;
    let cfg = ServeConfig {
        addr: args.addr,
        max_batch: args.max_batch,
        max_wait: Duration::from_millis(args.max_wait_ms),
        max_body_bytes: args.max_body_bytes,
        max_pixels: args.max_pixels,
        timeout: Duration::from_millis(args.timeout_ms),
        max_queue: args.max_queue,
    };
    serve(detector, cfg, |addr| {
        // The URL on stdout is what scripts (and the tests) read to find a port-0 server.
        let _ = crate::print_stdout(&format!("http://{addr}\n"));
    })?;
    Ok(ExitCode::SUCCESS)
}
