//! The live page in headless Chromium: it renders, and the numbers it shows
//! are the numbers of `/revenue`. Chromium is Debian's `chromium` package,
//! installed by `scripts/ensure-deps.sh` (so `make test` and CI have it).

mod support;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use support::kafka::*;
use tally::gen::{self, GenSpec};
use tally::pod;
use tally::serve::follower as serving;
use tally::serve::http::{app, AppState};
use tally::telemetry::metrics::Metrics;
use tower::ServiceExt;

fn chromium() -> String {
    for c in ["chromium", "/usr/bin/chromium", "chromium-browser"] {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c.to_string();
        }
    }
    panic!("chromium is not installed: run scripts/ensure-deps.sh (it installs Debian's chromium package)");
}

/// The text of the element with `id` in the dumped DOM.
fn text_of(dom: &str, id: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let rest = &dom[at..];
    let start = rest.find('>')? + 1;
    let end = rest[start..].find('<')?;
    Some(rest[start..start + end].to_string())
}

/// The cells of the totals row for one currency.
fn row_of(dom: &str, currency: &str) -> Option<Vec<String>> {
    let at = dom.find(&format!("<tr data-currency=\"{currency}\""))?;
    let rest = &dom[at..];
    let end = rest.find("</tr>")?;
    Some(
        rest[..end]
            .split("<td>")
            .skip(1)
            .map(|c| c.split('<').next().unwrap_or("").to_string())
            .collect(),
    )
}

#[test]
fn the_live_page_shows_the_numbers_of_revenue() {
    let browser = chromium();
    let specs = declared_topics();
    let broker = TestBroker::start(1, &specs);
    let brokers = broker.bootstrap_servers();
    let records = gen::generate(&GenSpec {
        count: 3_000,
        seed: 5,
        ..GenSpec::default()
    });
    produce_input(&brokers, &records);
    let metrics = Arc::new(Metrics::new());
    let cfg = pod_config(&brokers, "page", temp_dir("page"));
    let handle = pod::start_with_metrics(cfg.clone(), metrics.clone()).unwrap();
    wait_all_committed(
        &brokers,
        "page",
        "the pod to catch up",
        Duration::from_secs(90),
    );
    handle.join().unwrap();

    // The view has applied every revenue-windows record: numbers are stable.
    let follower = serving::follow(
        &brokers,
        &[],
        &topic("revenue-windows"),
        &topic("raw-orders"),
        &cfg.core().unwrap(),
        metrics.clone(),
    )
    .unwrap();
    let total: i64 = end_offsets(&brokers, "revenue-windows").values().sum();
    wait_until(
        "the view to apply every record",
        Duration::from_secs(60),
        || {
            follower.caught_up.load(Ordering::SeqCst)
                && follower.view.read().unwrap().records() == total as u64
        },
    );

    let state = AppState {
        view: follower.view.clone(),
        view_caught_up: follower.caught_up.clone(),
        pods: Vec::new(),
        ready_max_lag: 0,
        metrics,
        webhook: None,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    {
        let state = state.clone();
        rt.spawn(async move { axum::serve(listener, app(state)).await });
    }
    let revenue: serde_json::Value = rt.block_on(async {
        let resp = app(state.clone())
            .oneshot(Request::get("/revenue").body(Body::empty()).unwrap())
            .await
            .unwrap();
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap()
    });

    let profile = temp_dir("chromium-profile");
    let out = Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
        ])
        .args([
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--virtual-time-budget=10000", "--dump-dom"])
        .arg(format!("http://{addr}/"))
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page did not load its data; stderr: {}\nDOM: {dom}",
        String::from_utf8_lossy(&out.stderr)
    );

    let money = |v: &serde_json::Value| format!("{:.2}", v.as_f64().unwrap());
    assert_eq!(
        text_of(&dom, "total-combined").as_deref(),
        Some(money(&revenue["total"]["combined_usd"]).as_str())
    );
    assert_eq!(
        text_of(&dom, "total-final").as_deref(),
        Some(money(&revenue["total"]["final_usd"]).as_str())
    );
    let currencies = revenue["by_currency"].as_object().unwrap();
    assert!(currencies.len() >= 3);
    for (cur, s) in currencies {
        let row = row_of(&dom, cur).unwrap_or_else(|| panic!("no row for {cur}"));
        assert_eq!(
            row,
            vec![
                cur.clone(),
                money(&s["final_usd"]),
                money(&s["live_usd"]),
                money(&s["combined_usd"])
            ]
        );
    }
    // The chart has one line per currency.
    assert_eq!(dom.matches("<polyline").count(), currencies.len());
    follower.stop();
    let _ = std::fs::remove_dir_all(&profile);
    let _ = std::fs::remove_dir_all(&cfg.resources.state_dir);
}
