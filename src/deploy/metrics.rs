//! The counters `serve` exposes on `GET /metrics`, in the Prometheus text exposition format (0.0.4).
//!
//! Written by hand: a few counters and one histogram do not need a metrics framework, and the output is
//! easy to check against the format's spec. Routes are a fixed set of labels (unknown paths count as
//! `other`), so a scanner cannot blow up the label cardinality.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Label values for the `route` label.
pub const ROUTES: [&str; 5] = ["/v1/score", "/v1/model", "/healthz", "/metrics", "other"];

#[derive(Debug, Default)]
struct Histogram {
    /// Counts per bucket (not cumulative; summed when rendered).
    buckets: [u64; LATENCY_BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// Server metrics; shared between handlers and the batcher.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<Histogram>,
    images: AtomicU64,
    ood: AtomicU64,
    batches: AtomicU64,
    batch_images: AtomicU64,
}

fn route_label(route: &str) -> &'static str {
    ROUTES
        .iter()
        .find(|r| **r == route)
        .copied()
        .unwrap_or("other")
}

impl Metrics {
    /// Counts a finished request.
    pub fn request(&self, route: &str, status: u16) {
        let route = route_label(route);
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((route, status))
            .or_default() += 1;
    }

    /// Records the latency of one `POST /v1/score` request (answered with any status).
    pub fn score_latency(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let mut h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
            h.buckets[i] += 1;
        }
        h.sum += secs;
        h.count += 1;
    }

    /// Counts scored images and how many of them were OOD.
    pub fn scored(&self, images: u64, ood: u64) {
        self.images.fetch_add(images, Ordering::Relaxed);
        self.ood.fetch_add(ood, Ordering::Relaxed);
    }

    /// Counts one session run of `images` images (micro-batching at work: images per batch > 1).
    pub fn batch(&self, images: u64) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batch_images.fetch_add(images, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let requests = self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let errors: u64 = requests
            .iter()
            .filter(|((_, code), _)| *code >= 400)
            .map(|(_, n)| n)
            .sum();
        let _ = writeln!(
            s,
            "# HELP dream_ood_requests_total HTTP requests by route and status code.\n\
             # TYPE dream_ood_requests_total counter"
        );
        for ((route, code), n) in &requests {
            let _ = writeln!(
                s,
                "dream_ood_requests_total{{route=\"{route}\",code=\"{code}\"}} {n}"
            );
        }
        let images = self.images.load(Ordering::Relaxed);
        let ood = self.ood.load(Ordering::Relaxed);
        let rate = if images == 0 {
            0.0
        } else {
            ood as f64 / images as f64
        };
        let counters = [
            (
                "dream_ood_request_errors_total",
                "counter",
                "HTTP requests answered with a 4xx or 5xx status.",
                errors.to_string(),
            ),
            (
                "dream_ood_images_scored_total",
                "counter",
                "Images scored.",
                images.to_string(),
            ),
            (
                "dream_ood_images_ood_total",
                "counter",
                "Scored images flagged out-of-distribution (score < threshold).",
                ood.to_string(),
            ),
            (
                "dream_ood_ood_rate",
                "gauge",
                "Fraction of scored images flagged out-of-distribution since start.",
                rate.to_string(),
            ),
            (
                "dream_ood_batches_total",
                "counter",
                "ONNX Runtime session runs (micro-batches).",
                self.batches.load(Ordering::Relaxed).to_string(),
            ),
            (
                "dream_ood_batch_images_total",
                "counter",
                "Images in all micro-batches (divide by batches for the mean batch size).",
                self.batch_images.load(Ordering::Relaxed).to_string(),
            ),
        ];
        for (name, kind, help, value) in counters {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let name = "dream_ood_request_duration_seconds";
        let _ = writeln!(
            s,
            "# HELP {name} Latency of POST /v1/score requests, from arrival to response.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (le, n) in LATENCY_BUCKETS.iter().zip(h.buckets) {
            cumulative += n;
            let _ = writeln!(s, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(s, "{name}_sum {}\n{name}_count {}", h.sum, h.count);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_rate_and_cumulative_buckets() {
        let m = Metrics::default();
        for (code, ms) in [(200, 3), (200, 40), (413, 100_000)] {
            m.request("/v1/score", code);
            m.score_latency(Duration::from_millis(ms));
        }
        m.request("/wp-admin", 404);
        m.scored(4, 1);
        m.batch(3);
        m.batch(1);
        let text = m.render();
        for line in [
            "dream_ood_requests_total{route=\"/v1/score\",code=\"200\"} 2",
            "dream_ood_requests_total{route=\"/v1/score\",code=\"413\"} 1",
            "dream_ood_requests_total{route=\"other\",code=\"404\"} 1",
            "dream_ood_request_errors_total 2",
            "dream_ood_images_scored_total 4",
            "dream_ood_images_ood_total 1",
            "dream_ood_ood_rate 0.25",
            "dream_ood_batches_total 2",
            "dream_ood_batch_images_total 4",
            "dream_ood_request_duration_seconds_bucket{le=\"0.005\"} 1",
            "dream_ood_request_duration_seconds_bucket{le=\"0.025\"} 1",
            "dream_ood_request_duration_seconds_bucket{le=\"0.05\"} 2",
            "dream_ood_request_duration_seconds_bucket{le=\"30\"} 2",
            "dream_ood_request_duration_seconds_bucket{le=\"+Inf\"} 3",
            "dream_ood_request_duration_seconds_count 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
