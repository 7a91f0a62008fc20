//! The HTTP adapter (axum). `app(state)` builds the router; tests drive it
//! with `oneshot`, no socket.
//!
//! Every client mistake is a 4xx with a JSON body `{"error", "detail"}`;
//! data this pod cannot vouch for yet (the view is still reading
//! `revenue-windows`) is a 503 with `Retry-After`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hmac::{Hmac, Mac};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::pod::Stats;
use crate::telemetry::metrics::Metrics;
use tally_core::view::{View, WindowQuery};
use tally_core::{parse_order, Limits};

/// The webhook's ingest path: verified bodies go to the input topic.
pub struct Webhook {
    pub secret: Option<Vec<u8>>,
    pub producer: FutureProducer,
    pub topic: String,
    pub limits: Limits,
    /// How far a request's signed timestamp may be from this pod's clock.
    pub tolerance: Duration,
    /// Also accept the body-only signature (no timestamp), which a captured
    /// request can be replayed with forever; for senders not yet updated.
    pub legacy_signature: bool,
    /// A body not received within this long is refused (408).
    pub body_timeout: Duration,
    /// Signatures accepted within the tolerance: a request seen again
    /// inside it is a replay.
    seen: std::sync::Mutex<ReplayCache>,
}

impl Webhook {
    /// A webhook with the default tolerance (5 minutes), body timeout
    /// (10 s) and no legacy signatures.
    pub fn new(
        secret: Option<Vec<u8>>,
        producer: FutureProducer,
        topic: String,
        limits: Limits,
    ) -> Self {
        Webhook {
            secret,
            producer,
            topic,
            limits,
            tolerance: Duration::from_secs(300),
            legacy_signature: false,
            body_timeout: Duration::from_secs(10),
            seen: std::sync::Mutex::new(ReplayCache::default()),
        }
    }
}

/// The signatures of requests accepted within the tolerance window, with
/// when each may be forgotten (once its timestamp is outside the window,
/// the request is refused for its age anyway).
#[derive(Default)]
struct ReplayCache {
    by_expiry: std::collections::VecDeque<(i64, [u8; 32])>,
    seen: std::collections::HashSet<[u8; 32]>,
}

impl ReplayCache {
    fn forget_until(&mut self, now_ms: i64) {
        while self.by_expiry.front().is_some_and(|(t, _)| *t < now_ms) {
            if let Some((_, old)) = self.by_expiry.pop_front() {
                self.seen.remove(&old);
            }
        }
    }

    fn contains(&mut self, sig: &[u8; 32], now_ms: i64) -> bool {
        self.forget_until(now_ms);
        self.seen.contains(sig)
    }

    fn remember(&mut self, sig: [u8; 32], forget_at_ms: i64) {
        if self.seen.insert(sig) {
            self.by_expiry.push_back((forget_at_ms, sig));
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub view: Arc<RwLock<View>>,
    pub view_caught_up: Arc<AtomicBool>,
    /// The local pod's engine threads, one entry each (none: a
    /// serving-only process). Readiness needs every thread's: joined,
    /// restored, caught up (the lag is their sum).
    pub pods: Vec<Arc<Stats>>,
    /// Readiness requires the pod's lag to be at most this.
    pub ready_max_lag: u64,
    pub metrics: Arc<Metrics>,
    pub webhook: Option<Arc<Webhook>>,
}

/// A JSON error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    detail: String,
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn bad_request(detail: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error: "bad_request",
            detail: detail.into(),
            retry_after: None,
        }
    }

    fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            error,
            detail: detail.into(),
            retry_after: None,
        }
    }

    fn not_ready() -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: "not_ready",
            detail: "still reading revenue-windows; retry shortly".into(),
            retry_after: Some(1),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({"error": self.error, "detail": self.detail})),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/startupz", get(startupz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/revenue", get(revenue))
        .route("/revenue/windows", get(windows))
        .route("/revenue/sessions/{customer_id}", get(sessions))
        .route("/webhook/orders", post(webhook))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; see /openapi.json",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// The `method` label: the methods HTTP defines, and `other` for the
/// rest, so a client cannot add a series per made-up method.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Records request latency per route, method and status, and gives every
/// client or server error a JSON body: the ones axum makes itself (a
/// wrong method, a path that does not decode) are plain text otherwise.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = method_label(req.method());
    let started = Instant::now();
    let resp = json_error_body(next.run(req).await).await;
    state
        .metrics
        .http_duration
        .with_label_values(&[&route, method, resp.status().as_str()])
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// A 4xx or 5xx without a JSON body becomes `{"error", "detail"}`: the
/// error is the status's name, the detail the text it had.
async fn json_error_body(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let error = status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase()
        .replace([' ', '-'], "_");
    let detail = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    let mut r = (status, Json(json!({"error": error, "detail": detail}))).into_response();
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && !r.headers().contains_key(k) {
            r.headers_mut().insert(k.clone(), v.clone());
        }
    }
    r
}

/// Why the pod is not ready, one sentence per cause (empty: ready).
fn not_ready_because(state: &AppState, pod: &PodProgress) -> Vec<String> {
    let mut why = Vec::new();
    if let Some(e) = engine_failure(state) {
        why.push(format!("the engine thread failed: {e}"));
    }
    if let Some(s) = &pod.starting {
        why.push(format!("starting: {s}"));
    }
    if !pod.joined {
        why.push("not yet given partitions by the consumer group".into());
    }
    if !pod.restoring.is_empty() {
        why.push(format!("restoring partitions {:?}", pod.restoring));
    }
    why.extend(pod.blocked.iter().map(|(_, b)| b.clone()));
    if pod.lag > state.ready_max_lag {
        why.push(format!(
            "consumer lag {} above the ready limit {}",
            pod.lag, state.ready_max_lag
        ));
    }
    if !state.view_caught_up.load(Ordering::Relaxed) {
        why.push("still reading revenue-windows".into());
    }
    why
}

fn readiness(state: &AppState) -> (bool, Value) {
    let view = state.view_caught_up.load(Ordering::Relaxed);
    let pod = pod_progress(state);
    let why = not_ready_because(state, &pod);
    let ready = why.is_empty();
    state.metrics.ready.set(if ready { 1.0 } else { 0.0 });
    let blocked: Vec<i32> = pod.blocked.iter().map(|(p, _)| *p).collect();
    (
        ready,
        json!({"ready": ready, "not_ready_because": why, "view_caught_up": view, "joined_group": pod.joined, "starting": pod.starting, "restoring_partitions": pod.restoring, "blocked_partitions": blocked, "consumer_lag": pod.lag, "max_lag": state.ready_max_lag}),
    )
}

/// What readiness needs of the pod.
struct PodProgress {
    joined: bool,
    lag: u64,
    restoring: Vec<i32>,
    blocked: Vec<(i32, String)>,
    starting: Option<String>,
}

fn pod_progress(state: &AppState) -> PodProgress {
    let mut p = PodProgress {
        joined: true,
        lag: 0,
        restoring: Vec::new(),
        blocked: Vec::new(),
        starting: None,
    };
    for s in &state.pods {
        p.joined &= s.joined.load(Ordering::Relaxed);
        p.lag += s.lag.load(Ordering::Relaxed);
        if let Ok(r) = s.restoring.lock() {
            p.restoring.extend(r.iter().copied());
        }
        if let Ok(b) = s.blocked.lock() {
            p.blocked.extend(b.iter().cloned());
        }
        if p.starting.is_none() {
            p.starting = s.starting.lock().ok().and_then(|s| s.clone());
        }
    }
    p.restoring.sort_unstable();
    p.blocked.sort_unstable();
    p
}

/// For a startup probe: the pod has started, joined its group and
/// restored the state of what it was assigned. Unlike `/readyz` it ignores
/// lag, so a pod with a backlog is not restarted for having one, and
/// partitions it refuses to rebuild (a restart would not help; an
/// operator must decide), which `/readyz` reports.
async fn startupz(State(state): State<AppState>) -> Response {
    let pod = pod_progress(&state);
    let started = pod.starting.is_none() && pod.joined && pod.restoring.is_empty();
    let status = if started {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(
            json!({"started": started, "starting": pod.starting, "joined_group": pod.joined, "restoring_partitions": pod.restoring}),
        ),
    )
        .into_response()
}

/// Why an engine thread of this pod failed, if one did.
fn engine_failure(state: &AppState) -> Option<String> {
    state.pods.iter().find_map(|s| s.failure())
}

/// Alive unless an engine thread failed: the process is then on its way
/// out, and must not be taken for a working pod meanwhile.
async fn livez(State(state): State<AppState>) -> Response {
    match engine_failure(&state) {
        None => "ok".into_response(),
        Some(why) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "engine_failed", why).into_response()
        }
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    let (ready, body) = readiness(&state);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut r = (status, Json(body)).into_response();
    if !ready {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

async fn metrics(State(state): State<AppState>) -> Response {
    readiness(&state);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Query parameters: every name must be known, and appear once.
fn params(raw: Option<String>, known: &[&str]) -> Result<HashMap<String, String>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("query string: {e}")))?;
    let mut out = HashMap::new();
    for (k, v) in pairs {
        if !known.contains(&k.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown parameter {k:?}; known: {}",
                known.join(", ")
            )));
        }
        if out.insert(k.clone(), v).is_some() {
            return Err(ApiError::bad_request(format!(
                "parameter {k:?} given twice"
            )));
        }
    }
    Ok(out)
}

/// A time: epoch milliseconds or RFC 3339.
fn time_param(p: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    let Some(v) = p.get(name) else {
        return Ok(None);
    };
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(Some(ms));
    }
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| Some(t.timestamp_millis()))
        .map_err(|_| {
            ApiError::bad_request(format!(
                "{name}: {v:?} is neither epoch milliseconds nor RFC 3339"
            ))
        })
}

fn range(p: &HashMap<String, String>) -> Result<(Option<i64>, Option<i64>), ApiError> {
    let (from, to) = (time_param(p, "from")?, time_param(p, "to")?);
    if let (Some(f), Some(t)) = (from, to) {
        if f > t {
            return Err(ApiError::bad_request("from must not be after to"));
        }
    }
    Ok((from, to))
}

fn read_view(state: &AppState) -> Result<std::sync::RwLockReadGuard<'_, View>, ApiError> {
    if !state.view_caught_up.load(Ordering::Relaxed) {
        return Err(ApiError::not_ready());
    }
    state.view.read().map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "view lock poisoned",
        )
    })
}

/// `GET /revenue`: final + live = combined per currency and per region, over
/// tumbling windows starting in [from, to). Default range: every window the
/// view holds (what `revenue-windows` retains).
async fn revenue(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let p = params(q, &["from", "to", "window"])?;
    let (from, to) = range(&p)?;
    let view = read_view(&state)?;
    // One tumbling definition per group-by: the one named, or the shortest
    // configured (two of the same size are ambiguous: 400).
    let named = p.get("window").map(String::as_str);
    let mut used = serde_json::Map::new();
    let mut split = |by: &str| -> Result<BTreeMap<String, tally_core::view::Split>, ApiError> {
        let def = view
            .revenue_definition(by, named)
            .map_err(|e| ApiError::bad_request(format!("window: {e}")))?;
        Ok(match def {
            Some(spec) => {
                let m = view.revenue_split(by, &spec, from, to);
                used.insert(by.to_string(), Value::from(spec));
                m
            }
            None => BTreeMap::new(),
        })
    };
    let by_currency = split("currency")?;
    let by_region = split("region")?;
    if named.is_some() && used.is_empty() {
        return Err(ApiError::bad_request(
            "window: the definition groups by neither currency nor region",
        ));
    }
    let sum_of = |m: &BTreeMap<String, tally_core::view::Split>| {
        let t = tally_core::view::Split::total(m.values());
        json!({"final_usd": t.final_usd, "live_usd": t.live_usd, "combined_usd": t.combined_usd})
    };
    // The total sums one definition: by currency when it has one, else by
    // region (each order is in exactly one window of a definition).
    let total = if used.contains_key("currency") {
        sum_of(&by_currency)
    } else {
        sum_of(&by_region)
    };
    Ok(Json(json!({
        "range": {"from": from, "to": to},
        "windows": used,
        "total": total,
        "by_currency": by_currency,
        "by_region": by_region,
        "as_of": view.as_of(),
    })))
}

/// `GET /revenue/windows`: one row per merged window.
async fn windows(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let p = params(
        q,
        &[
            "kind", "by", "key", "from", "to", "final", "limit", "window",
        ],
    )?;
    let kind = p.get("kind").cloned().unwrap_or_else(|| "tumbling".into());
    if !["tumbling", "sliding", "session"].contains(&kind.as_str()) {
        return Err(ApiError::bad_request(format!(
            "kind: {kind:?} is not tumbling, sliding or session"
        )));
    }
    let default_by = if kind == "session" {
        "customer"
    } else {
        "currency"
    };
    let by = p.get("by").cloned().unwrap_or_else(|| default_by.into());
    if !["currency", "region", "customer"].contains(&by.as_str()) {
        return Err(ApiError::bad_request(format!(
            "by: {by:?} is not currency, region or customer"
        )));
    }
    if kind == "session" && by != "customer" {
        return Err(ApiError::bad_request("sessions are by customer"));
    }
    let is_final = match p.get("final").map(String::as_str) {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "final: {v:?} is not true or false"
            )))
        }
    };
    let limit = match p.get("limit") {
        None => 1_000,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=100_000).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "limit: {v:?} is not a number from 1 to 100000"
                )))
            }
        },
    };
    let (from, to) = range(&p)?;
    let view = read_view(&state)?;
    let known = view.kinds();
    if !known.is_empty() && !known.contains(&(kind.clone(), by.clone())) {
        let list: Vec<String> = known.iter().map(|(k, b)| format!("{k}/{b}")).collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_such_window",
            format!("no {kind} windows by {by}; defined: {}", list.join(", ")),
        ));
    }
    let q = WindowQuery {
        kind,
        by,
        key: p.get("key").cloned(),
        from,
        to,
        is_final,
        limit,
        spec: p.get("window").cloned(),
    };
    let rows = view.windows(&q);
    Ok(Json(
        json!({"windows": rows, "count": rows.len(), "as_of": view.as_of()}),
    ))
}

/// `GET /revenue/sessions/{customer_id}`.
async fn sessions(
    State(state): State<AppState>,
    Path(customer): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    params(q, &[])?;
    if customer.is_empty() || customer.len() > 1_024 {
        return Err(ApiError::bad_request("customer_id must be 1 to 1024 bytes"));
    }
    let view = read_view(&state)?;
    let rows = view.customer_sessions(&customer);
    Ok(Json(
        json!({"customer_id": customer, "sessions": rows, "as_of": view.as_of()}),
    ))
}

/// Signature header: `sha256=<hex>` (or bare hex) of
/// HMAC-SHA256(secret, `<timestamp>.<body>`).
pub const SIGNATURE_HEADER: &str = "x-tally-signature";

/// The signed timestamp: Unix seconds when the request was sent.
pub const TIMESTAMP_HEADER: &str = "x-tally-timestamp";

/// The signature of `body` sent at `timestamp` (Unix seconds), as the
/// webhook expects it: the timestamp is signed with the body, so a
/// captured request cannot be replayed outside the tolerance window.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut message = format!("{timestamp}.").into_bytes();
    message.extend_from_slice(body);
    sign_bytes(secret, &message)
}

/// The legacy signature: of the body alone (`--webhook-legacy-signature`).
pub fn sign_body_only(secret: &[u8], body: &[u8]) -> String {
    sign_bytes(secret, body)
}

fn sign_bytes(secret: &[u8], message: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(message);
    let out = mac.finalize().into_bytes();
    format!(
        "sha256={}",
        out.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// Checks the signature of `body` and its timestamp, and that the request
/// was not accepted before within the tolerance. Returns the signature
/// and when it may be forgotten, to remember once the order is accepted
/// (a request refused for an unavailable broker may be sent again as it
/// is); `None` for a legacy signature, which has no timestamp to bound a
/// replay cache.
fn verify_request(
    hook: &Webhook,
    secret: &[u8],
    body: &[u8],
    headers: &HeaderMap,
) -> Result<Option<([u8; 32], i64)>, ApiError> {
    let unauthorized = |d: String| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", d);
    let Some(ts) = headers.get(TIMESTAMP_HEADER) else {
        if hook.legacy_signature {
            return verify(secret, body, headers.get(SIGNATURE_HEADER)).map(|_| None);
        }
        return Err(unauthorized(format!(
            "missing {TIMESTAMP_HEADER} header (Unix seconds, signed with the body)"
        )));
    };
    let ts: i64 = ts
        .to_str()
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| unauthorized(format!("{TIMESTAMP_HEADER} is not Unix seconds")))?;
    let now_ms = crate::pod::now_ms();
    let tolerance_ms = hook.tolerance.as_millis() as i64;
    let skew_ms = ts.saturating_mul(1000).saturating_sub(now_ms);
    // unsigned_abs: a timestamp near i64::MIN saturates to it, whose
    // abs() overflows (the fuzzer's first finding).
    if skew_ms.unsigned_abs() > tolerance_ms.unsigned_abs() {
        return Err(unauthorized(format!(
            "{TIMESTAMP_HEADER} is {} s from this server's clock (allowed: {} s)",
            skew_ms / 1000,
            tolerance_ms / 1000
        )));
    }
    let mut message = format!("{ts}.").into_bytes();
    message.extend_from_slice(body);
    let sig = verify(secret, &message, headers.get(SIGNATURE_HEADER))?;
    let seen = hook.seen.lock().map(|mut c| c.contains(&sig, now_ms));
    if seen.unwrap_or(false) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "replayed",
            "this signed request was already accepted",
        ));
    }
    Ok(Some((
        sig,
        ts.saturating_mul(1000).saturating_add(tolerance_ms),
    )))
}

fn verify(secret: &[u8], body: &[u8], header: Option<&HeaderValue>) -> Result<[u8; 32], ApiError> {
    let unauthorized = |d: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", d);
    let h = header
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| unauthorized("missing x-tally-signature header"))?;
    let hex = h.trim().strip_prefix("sha256=").unwrap_or(h.trim());
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(unauthorized("signature is not sha256=<64 hex digits>"));
    }
    let mut sig = [0u8; 32];
    for (i, b) in sig.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(body);
    // Constant-time comparison.
    mac.verify_slice(&sig)
        .map_err(|_| unauthorized("signature does not match the body"))?;
    Ok(sig)
}

/// `POST /webhook/orders`: size limit (413), signature (401), order
/// validation (400), then produced to the input topic keyed by customer_id
/// and acknowledged (202).
async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let count = |r: &str| state.metrics.webhook_requests.with_label_values(&[r]).inc();
    let Some(hook) = state.webhook.clone() else {
        count("disabled");
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "webhook_disabled",
            "this pod has no webhook",
        ));
    };
    let Some(secret) = hook.secret.clone() else {
        count("disabled");
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "webhook_disabled",
            "set TALLY_WEBHOOK_SECRET to enable the webhook",
        ));
    };
    let limit = hook.limits.max_message_bytes;
    let bytes: Bytes =
        match tokio::time::timeout(hook.body_timeout, axum::body::to_bytes(body, limit)).await {
            Ok(Ok(b)) => b,
            Err(_) => {
                count("timeout");
                let mut r = ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!("the body did not arrive within {:?}", hook.body_timeout),
                )
                .into_response();
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return Ok(r);
            }
            Ok(Err(_)) => {
                count("too_large");
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the body exceeds {limit} bytes"),
                ));
            }
        };
    let signature = match verify_request(&hook, &secret, &bytes, &headers) {
        Ok(s) => s,
        Err(e) => {
            count(if e.status == StatusCode::CONFLICT {
                "replayed"
            } else {
                "unauthorized"
            });
            return Err(e);
        }
    };
    let order = match parse_order(&bytes, &hook.limits) {
        Ok(o) => o,
        Err(r) => {
            count("invalid");
            return Err(ApiError {
                status: StatusCode::BAD_REQUEST,
                error: "invalid_order",
                detail: format!("{}: {}", r.reason, r),
                retry_after: None,
            });
        }
    };
    let record = FutureRecord::to(&hook.topic)
        .key(&order.customer_id)
        .payload(bytes.as_ref());
    match hook.producer.send(record, Duration::from_secs(10)).await {
        Ok(delivery) => {
            count("accepted");
            if let (Some((sig, forget_at)), Ok(mut seen)) = (signature, hook.seen.lock()) {
                seen.remember(sig, forget_at);
            }
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({"accepted": true, "order_id": order.order_id, "partition": delivery.partition, "offset": delivery.offset})),
            )
                .into_response())
        }
        Err((e, _)) => {
            count("unavailable");
            Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                error: "unavailable",
                detail: format!("could not write to {}: {e}", hook.topic),
                retry_after: Some(1),
            })
        }
    }
}

async fn openapi() -> Json<Value> {
    Json(openapi_doc())
}

/// The OpenAPI 3 description of every endpoint.
pub fn openapi_doc() -> Value {
    let err = json!({"description": "client error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let unavailable = json!({"description": "not ready (Retry-After)", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let time = |name: &str, what: &str| json!({"name": name, "in": "query", "required": false, "description": what, "schema": {"type": "string"}});
    json!({
        "openapi": "3.0.3",
        "info": {"title": "tally", "version": env!("CARGO_PKG_VERSION"), "description": "Live, exact order revenue from Kafka."},
        "paths": {
            "/revenue": {"get": {
                "summary": "Final + live = combined revenue per currency and per region, from one tumbling definition per group-by (windows: which)",
                "parameters": [time("from", "window start ≥ from (epoch ms or RFC 3339); default: all retained"), time("to", "window start < to"),
                    {"name": "window", "in": "query", "description": "the tumbling definition to sum; default: the shortest configured per group-by (400 when two tie)", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "summary with as_of"}, "400": err, "503": unavailable}}},
            "/revenue/windows": {"get": {
                "summary": "One row per merged window with every aggregate",
                "parameters": [
                    {"name": "kind", "in": "query", "schema": {"type": "string", "enum": ["tumbling", "sliding", "session"], "default": "tumbling"}},
                    {"name": "by", "in": "query", "schema": {"type": "string", "enum": ["currency", "region", "customer"]}},
                    {"name": "key", "in": "query", "schema": {"type": "string"}},
                    {"name": "window", "in": "query", "description": "one definition by name (also one no longer configured); default: every configured definition", "schema": {"type": "string"}},
                    time("from", "window start ≥ from"), time("to", "window start < to"),
                    {"name": "final", "in": "query", "schema": {"type": "boolean"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100000, "default": 1000}}],
                "responses": {"200": {"description": "windows with as_of"}, "400": err, "404": err, "503": unavailable}}},
            "/revenue/sessions/{customer_id}": {"get": {
                "summary": "A customer's sessions",
                "parameters": [{"name": "customer_id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "sessions with as_of"}, "400": err, "503": unavailable}}},
            "/webhook/orders": {"post": {
                "summary": "Ingest one order; x-tally-timestamp: Unix seconds, x-tally-signature: sha256=<hex HMAC-SHA256 of \"<timestamp>.<raw body>\">",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {"202": {"description": "written to raw-orders"}, "400": err, "401": err, "408": err, "409": err, "413": err, "503": unavailable}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text format)", "responses": {"200": {"description": "metrics"}}}},
            "/livez": {"get": {"summary": "The process is alive", "responses": {"200": {"description": "ok"}}}},
            "/readyz": {"get": {"summary": "Joined the group, restored, caught up, view read", "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
            "/startupz": {"get": {"summary": "Joined the group and restored the assigned partitions (lag ignored); for a startup probe", "responses": {"200": {"description": "started"}, "503": {"description": "joining or restoring"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3"}}}},
            "/": {"get": {"summary": "Live page", "responses": {"200": {"description": "HTML"}}}}
        },
        "components": {"schemas": {"Error": {"type": "object", "required": ["error", "detail"], "properties": {"error": {"type": "string"}, "detail": {"type": "string"}}}}}
    })
}

async fn index() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

/// What one HTTP client may hold of a pod.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// A request's head must arrive within this long, and a connection
    /// idle this long between requests is closed.
    pub header_timeout: Duration,
    /// Open connections at most: more are closed as soon as accepted, so
    /// clients never take the file descriptors Kafka and RocksDB need.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until the task is dropped, under `limits`:
/// a connection that sends nothing, or half a request head, is closed
/// after `header_timeout`, whatever it does not send.
pub async fn serve(listener: tokio::net::TcpListener, app: Router, limits: ServerLimits) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors, most likely: wait for some to
                // come back rather than spin.
                tracing::warn!(error = %e, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            // Over the limit: closed at once.
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let _ = conn.await;
            drop(permit);
        });
    }
}
