//! Fuzzing the two parsers that face the outside, for a bounded time:
//! the order parser (bytes → order or rejection) and the HTTP router with
//! the webhook. Neither may panic; the order parser's one-pass and
//! general paths must agree; no request is answered with a 5xx other
//! than the webhook's documented 503, and every error has a JSON body.
//!
//! Each target runs for `TALLY_FUZZ_SECONDS` (5 by default, as part of
//! `make test`; CI gives each a minute). The seed is drawn at start and
//! printed; `TALLY_FUZZ_SEED=<seed>` replays a run.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use tally::serve::http::{app, sign, AppState, Webhook, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use tally::telemetry::metrics::Metrics;
use tally_core::view::View;
use tally_core::{
    parse_order, parse_order_fields, CoreConfig, Effect, Engine, FieldSpan, FxTable, InMemory,
    Limits,
};
use tower::ServiceExt;

/// Runs `check` on values of `strategy` until the time budget is spent.
fn fuzz<S: Strategy>(name: &str, strategy: S, mut check: impl FnMut(&S::Value))
where
    S::Value: std::fmt::Debug,
{
    let secs: u64 = std::env::var("TALLY_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("TALLY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("fuzz {name}: {secs} s, TALLY_FUZZ_SEED={seed}");
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &key),
    );
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut cases = 0u64;
    while Instant::now() < deadline {
        let value = strategy.new_tree(&mut runner).unwrap().current();
        if catch_unwind(AssertUnwindSafe(|| check(&value))).is_err() {
            panic!("fuzz {name}: a finding (TALLY_FUZZ_SEED={seed}, case {cases}): {value:?}");
        }
        cases += 1;
    }
    eprintln!("fuzz {name}: {cases} cases, no finding");
}

/// Order-like messages: known and unknown fields in any order, some
/// twice, with values of every type and at every edge, escaped keys,
/// then the bytes cut, or a byte changed, now and then.
fn messages() -> impl Strategy<Value = Vec<u8>> {
    let key = prop::sample::select(vec![
        "order_id",
        "customer_id",
        "amount",
        "currency",
        "created_at",
        "region",
        "note",
        "order\\u005fid",
        "amount\\\"",
        "é",
        "",
    ]);
    let value = prop_oneof![
        prop::sample::select(vec![
            "\"o1\"",
            "7",
            "-0",
            "0",
            "1e-9",
            "1e12",
            "1000000000000.000001",
            "9e18",
            "1e400",
            "-1",
            "\"12.5\"",
            "\"NaN\"",
            "\"inf\"",
            "null",
            "true",
            "[]",
            "{}",
            "\"usd\"",
            "\"XAU\"",
            "\"US\"",
            "1714564800",
            "1714564800000",
            "4102444799999",
            "\"2099-01-01T00:00:00Z\"",
            "\"1999-12-31T23:59:59Z\"",
            "\"2024-05-01T12:00:00+14:00\"",
            "\"\\u0000\"",
            "\"\\ud800\"",
            "{\"a\":[1,{\"b\":\"}\"}]}",
            "\"ü\"",
            "1.7976931348623157e308",
        ])
        .prop_map(str::to_string),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|x| format!("{x:?}")),
        "\"[ -~]{0,12}\"".prop_map(|s| s),
    ];
    let object = prop::collection::vec((key, value), 0..9).prop_map(|fields| {
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", body.join(",")).into_bytes()
    });
    let mutated = (
        object.clone(),
        any::<prop::sample::Index>(),
        any::<u8>(),
        0u8..4,
    )
        .prop_map(|(mut bytes, at, byte, how)| {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                match how {
                    0 => bytes.truncate(i),
                    1 => bytes[i] = byte,
                    2 => bytes.insert(i, byte),
                    _ => {}
                }
            }
            bytes
        });
    prop_oneof![
        3 => object,
        2 => mutated,
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

/// The order parser never panics; its one-pass path agrees with the
/// general one; the engine takes whatever it returns without panicking.
#[test]
fn the_order_parser() {
    let limits = Limits::default();
    let mut engine = Engine::new(CoreConfig::default(), FxTable::with_defaults()).unwrap();
    let mut offset = 0i64;
    fuzz("order parser", messages(), |bytes| {
        let general = parse_order(bytes, &limits);
        let mut fields: Vec<FieldSpan> = Vec::new();
        let one_pass = parse_order_fields(bytes, &limits, &mut fields);
        assert_eq!(one_pass, general, "{}", String::from_utf8_lossy(bytes));
        if !fields.is_empty() {
            assert!(one_pass.is_ok(), "fields listed for a rejected message");
        }
        let mut out: Vec<Effect> = Vec::new();
        engine.on_record_at(
            0,
            offset,
            bytes,
            Some(1_714_564_800_000),
            0,
            &mut out,
            &mut InMemory,
        );
        offset += 1;
    });
}

fn state() -> AppState {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", "127.0.0.1:1")
        .set("message.timeout.ms", "50")
        .create()
        .unwrap();
    let hook = Webhook::new(
        Some(b"0123456789abcdef-secret".to_vec()),
        producer,
        "raw-orders".into(),
        Limits::default(),
    );
    let mut view = View::new(10_000);
    view.set_definitions(tally_core::WindowSpec::defaults());
    AppState {
        view: Arc::new(RwLock::new(view)),
        view_caught_up: Arc::new(AtomicBool::new(true)),
        pods: Vec::new(),
        ready_max_lag: 0,
        metrics: Arc::new(Metrics::new()),
        webhook: Some(Arc::new(hook)),
    }
}

#[derive(Debug)]
struct Req {
    method: &'static str,
    path: String,
    query: String,
    timestamp: Option<String>,
    signature: Option<String>,
    body: Vec<u8>,
}

fn requests() -> impl Strategy<Value = Req> {
    let method = prop::sample::select(vec![
        "GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH",
    ]);
    let path = prop_oneof![
        prop::sample::select(vec![
            "/",
            "/livez",
            "/readyz",
            "/startupz",
            "/metrics",
            "/openapi.json",
            "/revenue",
            "/revenue/windows",
            "/revenue/sessions/c7",
            "/revenue/sessions/%FF",
            "/webhook/orders",
            "/webhook/orders/",
            "//revenue",
            "/revenue/../metrics",
        ])
        .prop_map(str::to_string),
        "/[a-z%0-9/._-]{0,24}".prop_map(|s| s),
    ];
    let query = "[a-z=&%0-9:TZ+._-]{0,40}";
    let timestamp = prop::option::of(prop_oneof![
        Just("now".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[ -~]{0,12}".prop_map(|s| s),
    ]);
    let signature = prop::option::of(prop_oneof![
        Just("sign".to_string()),
        "sha256=[0-9a-f]{64}".prop_map(|s| s),
        "[ -~]{0,80}".prop_map(|s| s),
    ]);
    (method, path, query, timestamp, signature, messages()).prop_map(
        |(method, path, query, timestamp, signature, body)| Req {
            method,
            path,
            query,
            timestamp,
            signature,
            body,
        },
    )
}

/// The HTTP router, webhook included, never panics and never answers
/// with a 5xx but the webhook's 503 for an unreachable broker; every
/// error has a JSON body.
#[test]
fn the_http_router() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let st = state();
    let now = || (tally::pod::now_ms() / 1000).to_string();
    fuzz("http router", requests(), |r| {
        let uri = if r.query.is_empty() {
            r.path.clone()
        } else {
            format!("{}?{}", r.path, r.query)
        };
        let mut b = Request::builder().method(r.method).uri(uri.as_str());
        let ts = r
            .timestamp
            .as_ref()
            .map(|t| if t == "now" { now() } else { t.clone() });
        if let Some(t) = &ts {
            b = b.header(TIMESTAMP_HEADER, t.as_str());
        }
        if let Some(s) = &r.signature {
            let s = if s == "sign" {
                let t: i64 = ts.as_deref().and_then(|t| t.parse().ok()).unwrap_or(0);
                sign(b"0123456789abcdef-secret", t, &r.body)
            } else {
                s.clone()
            };
            b = b.header(SIGNATURE_HEADER, s.as_str());
        }
        let Ok(req) = b.body(Body::from(r.body.clone())) else {
            return;
        };
        let (status, headers, body) = rt.block_on(async {
            let resp = app(st.clone()).oneshot(req).await.unwrap();
            let (parts, body) = resp.into_parts();
            (
                parts.status,
                parts.headers,
                body.collect().await.unwrap().to_bytes(),
            )
        });
        let webhook_unavailable = r.path == "/webhook/orders" && status.as_u16() == 503;
        assert!(
            status.as_u16() < 500 || webhook_unavailable,
            "{uri}: {status}"
        );
        // A HEAD response has no body, whatever its status.
        if r.method != "HEAD" && (status.is_client_error() || status.is_server_error()) {
            let json = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/json"));
            assert!(json, "{uri}: {status} without a JSON body");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(
                v["error"].is_string() && v["detail"].is_string(),
                "{uri}: {v}"
            );
        }
    });
}
