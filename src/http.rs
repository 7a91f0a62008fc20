//! The HTTP adapter. For now: liveness and a live view of the windows this
//! pod holds (`/revenue`), enough for `tally demo`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::core::WindowKind;
use crate::output::usd;
use crate::pod::Processor;

#[derive(Clone)]
pub struct AppState {
    pub processor: Arc<Mutex<Processor>>,
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/livez", get(|| async { "ok" }))
        .route("/revenue", get(revenue))
        .with_state(state)
}

/// Revenue of the tumbling windows this pod holds, per definition and key:
/// closed windows not yet purged count as `final`, open ones as `live`.
fn summary(state: &AppState) -> Value {
    let proc = state.processor.lock().unwrap_or_else(|e| e.into_inner());
    let mut by: BTreeMap<String, BTreeMap<String, (i128, i128)>> = BTreeMap::new();
    for w in proc.engine().snapshot() {
        if !matches!(w.kind, WindowKind::Tumbling { .. }) {
            continue;
        }
        let e = by
            .entry(w.by.name().to_string())
            .or_default()
            .entry(w.key.group.clone())
            .or_default();
        if w.row.closed {
            e.0 += w.row.agg.revenue_usd_micros;
        } else {
            e.1 += w.row.agg.revenue_usd_micros;
        }
    }
    let as_of: Vec<Value> = proc
        .engine()
        .partitions()
        .map(|(p, s)| json!({"partition": p, "next_offset": s.next_offset, "watermark": s.watermark, "idle": s.idle}))
        .collect();
    let groups: BTreeMap<String, Value> = by
        .into_iter()
        .map(|(k, m)| {
            let rows: BTreeMap<String, Value> = m
                .into_iter()
                .map(|(g, (f, l))| (g, json!({"final_usd": usd(f), "live_usd": usd(l), "combined_usd": usd(f + l)})))
                .collect();
            (k, json!(rows))
        })
        .collect();
    json!({"scope": "windows held by this pod", "by": groups, "as_of": as_of})
}

async fn revenue(State(state): State<AppState>) -> impl IntoResponse {
    Json(summary(&state))
}

async fn index(State(state): State<AppState>) -> impl IntoResponse {
    let body = serde_json::to_string_pretty(&summary(&state)).unwrap_or_default();
    Html(format!(
        "<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=2><title>tally</title>\
         <h1>tally: live revenue</h1><pre>{}</pre>",
        body.replace('<', "&lt;")
    ))
}
