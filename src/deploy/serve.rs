//! `dream-ood serve`: an exported detector behind HTTP (axum on tokio).
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/score` | a raw image body (PNG, JPEG, WebP), or `multipart/form-data` with one image per part → `{"results": [...]}` in order |
//! | `GET /v1/model` | the model's metadata ([`DetectorMetadata::to_json`]) |
//! | `GET /healthz` | `{"status": "ok"}` while the batcher runs |
//! | `GET /metrics` | Prometheus text ([`super::metrics`]) |
//!
//! Request path: the body is read under `max_body_bytes` (413), multipart is split with multer, each
//! image's dimensions are read from its header and checked against `max_pixels` before decoding (413:
//! decompression bombs cost nothing), decoding and the evaluation transform run on tokio's blocking pool,
//! and the prepared images go to the [`Batcher`], which micro-batches concurrent requests onto the one
//! session. The whole request runs under `timeout` (503 when exceeded; a full queue is 503 too). Every
//! error is a JSON body `{"error": "...", "part": ...}` with a 4xx/5xx status, and the server carries on.
//!
//! Shutdown: SIGTERM or Ctrl-C stops accepting connections, lets requests in flight finish, then stops
//! the batcher.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::batcher::{BatchPolicy, Batcher, SubmitError};
use super::metadata::DetectorMetadata;
use super::metrics::Metrics;
use super::scorer::{Detector, ImageError, Preprocessor, Scored};
use crate::error::{Error, Result};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    /// Most images per session run.
    pub max_batch: usize,
    /// Longest time the first request of a batch waits for others.
    pub max_wait: Duration,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest image (width × height), checked from the header before decoding.
    pub max_pixels: u64,
    /// Longest time for a whole `/v1/score` request.
    pub timeout: Duration,
    /// Requests that may wait for the batcher.
    pub max_queue: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_batch: 32,
            max_wait: Duration::from_millis(5),
            max_body_bytes: 20 << 20,
            max_pixels: 40_000_000,
            timeout: Duration::from_secs(30),
            max_queue: 1024,
        }
    }
}

struct AppState {
    batcher: Batcher,
    pre: Preprocessor,
    model: serde_json::Value,
    metrics: Arc<Metrics>,
    cfg: ServeConfig,
}

/// An error answer: status and message, plus the multipart part it concerns.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    msg: String,
    part: Option<serde_json::Value>,
}

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        ApiError {
            status,
            msg: msg.into(),
            part: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.msg });
        if let Some(p) = self.part {
            body["part"] = p;
        }
        (self.status, axum::Json(body)).into_response()
    }
}

/// Serves `detector` until SIGTERM or Ctrl-C. `on_ready` gets the bound address (port 0 picks one) once
/// the server accepts connections.
pub fn serve(
    detector: Detector,
    cfg: ServeConfig,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Decoding is CPU work: more blocking threads than cores only thrash.
        .max_blocking_threads(cores * 2)
        .thread_name("dream-ood-serve")
        .build()
        .map_err(|e| Error::io("<tokio runtime>", e))?;
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(cfg.addr)
                .await
                .map_err(|e| Error::InvalidValue {
                    key: "addr".to_owned(),
                    msg: format!("cannot listen on {}: {e}", cfg.addr),
                })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("<listener>", e))?;
        let (router, handle) = router(detector, cfg);
        tracing::info!("listening on http://{addr}");
        on_ready(addr);
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| Error::io("<http server>", e))?;
        // The router (and the batcher's queue with it) is gone: the thread ends after its last batch.
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        tracing::info!("server stopped");
        Ok(())
    })
}

/// The routes, with a batcher thread started on `detector`; the handle joins that thread once the router
/// is dropped.
pub fn router(detector: Detector, cfg: ServeConfig) -> (Router, std::thread::JoinHandle<()>) {
    let metrics = Arc::new(Metrics::default());
    let meta: &DetectorMetadata = detector.metadata();
    let model = meta.to_json();
    let pre = detector.preprocessor().with_max_pixels(cfg.max_pixels);
    let policy = BatchPolicy {
        max_batch: cfg.max_batch,
        max_wait: cfg.max_wait,
        max_queue: cfg.max_queue,
    };
    let (batcher, handle) = Batcher::start(detector, policy, metrics.clone());
    let state = Arc::new(AppState {
        batcher,
        pre,
        model,
        metrics,
        cfg,
    });
    let router = Router::new()
        .route("/v1/score", post(score))
        .route("/v1/model", get(model_info))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state);
    (router, handle)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM ({e}); only Ctrl-C stops the server");
                std::future::pending::<()>().await;
            }
        }
    };
    let name = tokio::select! {
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        _ = term => "SIGTERM",
    };
    tracing::info!("{name}: finishing the requests in flight, then stopping");
}

async fn model_info(State(st): State<Arc<AppState>>) -> Response {
    st.metrics.request("/v1/model", 200);
    axum::Json(st.model.clone()).into_response()
}

async fn healthz(State(st): State<Arc<AppState>>) -> Response {
    st.metrics.request("/healthz", 200);
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    st.metrics.request("/metrics", 200);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

async fn not_found(State(st): State<Arc<AppState>>, req: Request) -> Response {
    st.metrics.request("other", 404);
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route {} {}; routes: POST /v1/score, GET /v1/model, GET /healthz, GET /metrics",
            req.method(),
            req.uri().path()
        ),
    )
    .into_response()
}

async fn method_not_allowed(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let route = req.uri().path().to_owned();
    st.metrics.request(&route, 405);
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {route}", req.method()),
    )
    .into_response()
}

async fn score(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let answer =
        match tokio::time::timeout(st.cfg.timeout, score_request(&st, &headers, body)).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the request took longer than the server's limit of {} ms",
                    st.cfg.timeout.as_millis()
                ),
            )),
        };
    let response = match answer {
        Ok(results) => {
            let ood = results.iter().filter(|r| r.1.is_ood == Some(true)).count();
            st.metrics.scored(results.len() as u64, ood as u64);
            let results: Vec<serde_json::Value> = results
                .into_iter()
                .map(|(label, scored)| {
                    let mut v = serde_json::to_value(scored).expect("invariant: plain data");
                    if let (Some(obj), serde_json::Value::Object(label)) =
                        (v.as_object_mut(), label)
                    {
                        obj.extend(label.into_iter().filter(|(_, v)| !v.is_null()));
                    }
                    v
                })
                .collect();
            axum::Json(json!({ "results": results })).into_response()
        }
        Err(e) => {
            tracing::debug!(status = e.status.as_u16(), "{}", e.msg);
            e.into_response()
        }
    };
    st.metrics.request("/v1/score", response.status().as_u16());
    st.metrics.score_latency(started.elapsed());
    response
}

/// One image of a request: where it came from, and its bytes.
struct Part {
    label: serde_json::Value,
    bytes: Bytes,
}

async fn score_request(
    st: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> std::result::Result<Vec<(serde_json::Value, Scored)>, ApiError> {
    let limit = st.cfg.max_body_bytes;
    let bytes = read_body(body, limit).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let parts = if content_type.starts_with("multipart/") {
        multipart_parts(content_type, bytes).await?
    } else {
        vec![Part {
            label: serde_json::Value::Null,
            bytes,
        }]
    };
    if let Some(p) = parts.iter().find(|p| p.bytes.is_empty()) {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            msg: "empty image: send the image bytes as the body, or one image per multipart part"
                .to_owned(),
            part: (!p.label.is_null()).then(|| p.label.clone()),
        });
    }
    let labels: Vec<serde_json::Value> = parts.iter().map(|p| p.label.clone()).collect();
    let pre = st.pre.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        parts
            .into_iter()
            .map(|p| match pre.prepare_bytes(&p.bytes) {
                Ok(img) => Ok(img),
                Err(e) => Err(image_error(e, p.label)),
            })
            .collect::<std::result::Result<Vec<_>, ApiError>>()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let rx = st.batcher.submit(prepared).map_err(|e| match e {
        SubmitError::Full => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the server is busy ({} requests queued); retry later",
                st.cfg.max_queue
            ),
        ),
        SubmitError::Stopped => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is stopping")
        }
    })?;
    match rx.await {
        Ok(Ok(results)) => Ok(labels.into_iter().zip(results).collect()),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("scoring failed: {e}"),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is stopping",
        )),
    }
}

/// Reads a body of at most `limit` bytes. A larger one is read on and discarded up to [`DRAIN_FACTOR`] ×
/// `limit` before the 413 goes out: a client still writing its body when the server answers and closes
/// would otherwise get a broken pipe instead of the error (the "lingering close" web servers do).
async fn read_body(mut body: Body, limit: usize) -> std::result::Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        seen = seen.saturating_add(data.len());
        if seen <= limit {
            buf.extend_from_slice(&data);
        } else if seen > limit.saturating_mul(DRAIN_FACTOR) {
            break;
        }
    }
    if seen > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than the server's limit of {limit} bytes"),
        ));
    }
    Ok(Bytes::from(buf))
}

/// How far past the body limit a request is still read (and discarded) so that its client sees the 413.
const DRAIN_FACTOR: usize = 4;

fn image_error(e: ImageError, label: serde_json::Value) -> ApiError {
    let status = match e {
        ImageError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    let msg = match &e {
        ImageError::NotAnImage => {
            "not a PNG, JPEG or WebP image (judged by its content)".to_owned()
        }
        other => other.to_string(),
    };
    ApiError {
        status,
        msg,
        part: (!label.is_null()).then_some(label),
    }
}

async fn multipart_parts(
    content_type: &str,
    bytes: Bytes,
) -> std::result::Result<Vec<Part>, ApiError> {
    let bad = |msg: String| ApiError::new(StatusCode::BAD_REQUEST, msg);
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| bad(format!("bad multipart Content-Type: {e}")))?;
    let stream =
        futures_util::stream::once(async move { Ok::<Bytes, std::convert::Infallible>(bytes) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut parts = Vec::new();
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| bad(format!("malformed multipart body: {e}")))?
    {
        let label = json!({
            "index": parts.len(),
            "name": field.name(),
            "filename": field.file_name(),
        });
        let bytes = field
            .bytes()
            .await
            .map_err(|e| bad(format!("malformed multipart part {}: {e}", parts.len())))?;
        parts.push(Part { label, bytes });
    }
    if parts.is_empty() {
        return Err(bad("the multipart body has no parts".to_owned()));
    }
    Ok(parts)
}
