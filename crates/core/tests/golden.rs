//! Golden tests: each `tests/golden/NAME.script` is run through the engine and
//! every effect, one line each, must equal `tests/golden/NAME.expected`.
//! Run with `TALLY_BLESS=1` to rewrite the expected files after a deliberate
//! change, then review the diff.
//!
//! Script lines (times are relative to T0, a minute boundary):
//! - `config key=value ...`: windows=`kind:name:params:by` (comma separated;
//!   tumbling:NAME:SIZE:BY, sliding:NAME:SIZE:SLIDE:BY, session:NAME:GAP),
//!   ooo, grace, idle, dedup (all ms). Must come first if present.
//! - `order p=0 id=o1 cust=c1 amount=12.50 cur=EUR t=+1000 [region=eu] [wall=0]`
//! - `raw p=0 [wall=0] <bytes...>`: any input, verbatim.
//! - `tick [p=0] wall=31000`, `flush` (also marks the flush durable), `finish p=0`.

mod support;

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use support::{render, T0};
use tally_core::window::parse_window_list;
use tally_core::{CoreConfig, Engine, FxTable, StateChange, StateRow};

fn kv(words: &[&str]) -> HashMap<String, String> {
    words
        .iter()
        .filter_map(|w| {
            w.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn num(m: &HashMap<String, String>, k: &str, default: i64) -> i64 {
    m.get(k)
        .map(|v| {
            v.trim_start_matches('+')
                .parse()
                .unwrap_or_else(|_| panic!("bad {k}={v}"))
        })
        .unwrap_or(default)
}

fn run(script: &str) -> String {
    let mut cfg = CoreConfig::default();
    let mut engine: Option<Engine> = None;
    let mut offsets: HashMap<i32, i64> = HashMap::new();
    let mut out = Vec::new();
    for line in script.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(format!("> {line}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        let m = kv(&words[1..]);
        if words[0] == "config" {
            assert!(engine.is_none(), "config must come first");
            if let Some(w) = m.get("windows") {
                cfg.windows = parse_window_list(w).expect("valid windows");
            }
            cfg.out_of_orderness_ms = num(&m, "ooo", cfg.out_of_orderness_ms);
            cfg.grace_ms = num(&m, "grace", cfg.grace_ms);
            cfg.idle_timeout_ms = num(&m, "idle", cfg.idle_timeout_ms);
            cfg.dedup_horizon_ms = num(&m, "dedup", cfg.dedup_horizon_ms);
            continue;
        }
        let e = engine.get_or_insert_with(|| {
            Engine::new(cfg.clone(), FxTable::with_defaults()).expect("valid config")
        });
        let p = num(&m, "p", 0) as i32;
        let wall = num(&m, "wall", 0);
        let mut effects = Vec::new();
        match words[0] {
            "order" => {
                let bytes = format!(
                    r#"{{"order_id":"{}","customer_id":"{}","amount":"{}","currency":"{}","created_at":{},"region":"{}"}}"#,
                    m["id"],
                    m["cust"],
                    m["amount"],
                    m["cur"],
                    T0 + num(&m, "t", 0),
                    m.get("region").map(String::as_str).unwrap_or("eu")
                );
                let o = offsets.entry(p).or_insert(0);
                e.on_record(p, *o, bytes.as_bytes(), wall, &mut effects);
                *o += 1;
            }
            "raw" => {
                let rest: Vec<&str> = words[1..]
                    .iter()
                    .copied()
                    .filter(|w| !w.starts_with("p=") && !w.starts_with("wall="))
                    .collect();
                let o = offsets.entry(p).or_insert(0);
                e.on_record(p, *o, rest.join(" ").as_bytes(), wall, &mut effects);
                *o += 1;
            }
            "tick" if m.contains_key("p") => e.on_tick(p, wall, &mut effects),
            "tick" => e.tick(wall, &mut effects),
            "finish" => e.finish(p, &mut effects),
            "flush" => {
                let mut changes = Vec::new();
                let id = e.flush(&mut effects, &mut changes);
                e.on_durable(id);
                for c in changes {
                    if let StateChange::Put(p, StateRow::Meta(meta)) = c {
                        out.push(format!(
                            "meta p{p} next_offset={} watermark={}",
                            meta.next_offset,
                            meta.watermark
                                .map(support::rel)
                                .unwrap_or_else(|| "none".into())
                        ));
                    }
                }
            }
            other => panic!("unknown script command {other}"),
        }
        out.extend(effects.iter().map(render));
    }
    out.join("\n") + "\n"
}

#[test]
fn golden_scripts() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var_os("TALLY_BLESS").is_some();
    let mut scripts: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "script"))
        .collect();
    scripts.sort();
    assert!(
        scripts.len() >= 4,
        "golden scripts missing in {}",
        dir.display()
    );
    let mut failures = Vec::new();
    for script in scripts {
        let got = run(&fs::read_to_string(&script).unwrap());
        let expected_path = script.with_extension("expected");
        if bless {
            fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let want = fs::read_to_string(&expected_path).unwrap_or_default();
        if got != want {
            failures.push(format!(
                "{}:\n--- expected\n{want}--- got\n{got}",
                script.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
