//! The operations files against the binary: docker-compose.yml and the
//! Dockerfile (settings, ports, mounts), the Grafana dashboards and the
//! Prometheus alert rules (every query parses, and every metric it names is
//! in a live pod's `/metrics`). The compose schema check is in
//! `scripts/validate-manifests.sh`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use promql_parser::parser::{self, Expr};
use serde_yaml::Value;
use support::kafka::*;
use support::manifests::{at, pod_config_from_env, root, str_at, yaml_docs};
use tally::gen::{self, GenSpec};
use tally::pod;
use tally::serve::http::{app, AppState};
use tally_core::view::View;
use tower::ServiceExt;

/// `ENV` settings of the Dockerfile's final stage, and the instructions.
struct Dockerfile {
    stages: Vec<String>,
    env: Vec<(String, String)>,
    expose: Vec<u16>,
    lines: Vec<(String, String)>,
}

fn dockerfile() -> Dockerfile {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    // Join continuation lines, drop comments.
    let mut lines = Vec::new();
    let mut cur = String::new();
    for l in text.lines() {
        let t = l.trim();
        if t.starts_with('#') || t.is_empty() && cur.is_empty() {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (ins, rest) = cur.split_once(' ').unwrap_or((&cur, ""));
        lines.push((ins.to_uppercase(), rest.trim().to_string()));
        cur.clear();
    }
    let known = [
        "FROM",
        "RUN",
        "COPY",
        "ENV",
        "WORKDIR",
        "USER",
        "VOLUME",
        "EXPOSE",
        "ENTRYPOINT",
        "CMD",
        "ARG",
        "LABEL",
        "HEALTHCHECK",
        "ADD",
        "STOPSIGNAL",
        "SHELL",
        "ONBUILD",
    ];
    let mut d = Dockerfile {
        stages: Vec::new(),
        env: Vec::new(),
        expose: Vec::new(),
        lines: lines.clone(),
    };
    for (ins, rest) in &lines {
        assert!(known.contains(&ins.as_str()), "unknown instruction {ins}");
        match ins.as_str() {
            "FROM" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let image = words[0];
                assert!(
                    image.contains(':') && !image.ends_with(":latest"),
                    "base image {image} is pinned to a tag"
                );
                assert_eq!(words.get(1).map(|w| w.to_uppercase()), Some("AS".into()));
                d.stages.push(words[2].to_string());
                d.env.clear();
                d.expose.clear();
            }
            "ENV" => {
                for pair in rest.split_whitespace() {
                    let (k, v) = pair.split_once('=').expect("ENV key=value");
                    d.env.push((k.to_string(), v.to_string()));
                }
            }
            "EXPOSE" => d.expose.push(rest.parse().unwrap()),
            "COPY" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                if let Some(from) = words[0].strip_prefix("--from=") {
                    assert!(
                        d.stages.contains(&from.to_string()),
                        "COPY --from={from}: no such stage before it"
                    );
                } else {
                    for src in &words[..words.len() - 1] {
                        assert!(
                            root().join(src).exists(),
                            "COPY {src}: not in the repository"
                        );
                    }
                }
            }
            _ => {}
        }
    }
    assert!(d.stages.len() >= 2, "multi-stage");
    d
}

#[test]
fn the_dockerfile_builds_the_binary_and_runs_it_with_valid_settings() {
    let d = dockerfile();
    let cfg = pod_config_from_env(&d.env);
    let port: u16 = cfg
        .serving
        .http
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert_eq!(d.expose, [port]);
    assert!(d
        .lines
        .iter()
        .any(|(i, r)| i == "RUN" && r.contains("cargo build --release --locked --bin tally")));
    assert!(d
        .lines
        .iter()
        .any(|(i, r)| i == "ENTRYPOINT" && r.contains("/usr/local/bin/tally")));
    assert!(d
        .lines
        .iter()
        .any(|(i, r)| i == "USER" && !r.starts_with('0') && r != "root"));
    // The image carries the topic declarations where TALLY_TOPICS_DIR says.
    assert!(d.lines.iter().any(|(i, r)| i == "COPY"
        && r == &format!(
            "topics {}",
            cfg.topics
                .topics_dir
                .as_ref()
                .expect("the image sets TALLY_TOPICS_DIR")
                .display()
        )));
    // .dockerignore must not hide what the build copies.
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    for needed in ["src", "crates", "Cargo.toml", "Cargo.lock", "topics"] {
        assert!(
            !ignore.lines().any(|l| l.trim() == needed),
            "{needed} is ignored"
        );
    }
}

fn compose() -> Value {
    yaml_docs(&root().join("docker-compose.yml")).remove(0)
}

fn env_of(svc: &Value) -> Vec<(String, String)> {
    svc.get("environment")
        .and_then(Value::as_mapping)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.as_str().unwrap().into(), v.as_str().unwrap().into()))
                .collect()
        })
        .unwrap_or_default()
}

fn command(svc: &Value) -> Vec<String> {
    svc.get("command")
        .and_then(Value::as_sequence)
        .map(|s| s.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn compose_runs_kafka_topics_two_replicas_a_generator_prometheus_and_grafana() {
    let c = compose();
    let services = at(&c, &["services"]).as_mapping().unwrap();
    let svc = |name: &str| {
        services
            .get(name)
            .unwrap_or_else(|| panic!("no service {name}"))
    };

    let kafka = svc("kafka");
    // The Kafka users run is the one the tests run against.
    let script = std::fs::read_to_string(Path::new(&root()).join("scripts/kafka.sh")).unwrap();
    let tested = script
        .lines()
        .find_map(|l| l.strip_prefix("KAFKA_VERSION="))
        .expect("scripts/kafka.sh names its Kafka version");
    assert_eq!(str_at(kafka, &["image"]), format!("apache/kafka:{tested}"));
    let kenv: BTreeMap<_, _> = env_of(kafka).into_iter().collect();
    assert_eq!(kenv["KAFKA_AUTO_CREATE_TOPICS_ENABLE"], "false");
    assert!(kenv["KAFKA_PROCESS_ROLES"].contains("controller"), "KRaft");

    assert_eq!(command(svc("topics")), ["topics", "apply"]);
    assert_eq!(
        env_of(svc("topics")),
        [("TALLY_BROKERS".to_string(), "kafka:9092".to_string())]
    );

    // The image's ENV, then the service's environment, as the container sees them.
    let image_env = dockerfile().env;
    let mut replicas = Vec::new();
    for (name, s) in services {
        let name = name.as_str().unwrap();
        if command(s).first().map(String::as_str) != Some("run") {
            continue;
        }
        let mut vars = image_env.clone();
        vars.extend(env_of(s));
        let cfg = pod_config_from_env(&vars);
        let port = cfg.serving.http.rsplit_once(':').unwrap().1.to_string();
        let ports: Vec<String> = at(s, &["ports"])
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect();
        assert!(
            ports.iter().all(|p| p.ends_with(&format!(":{port}"))),
            "{name}: {ports:?}"
        );
        let mounts: Vec<String> = at(s, &["volumes"])
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().split(':').nth(1).unwrap().to_string())
            .collect();
        assert!(
            mounts
                .iter()
                .any(|m| cfg.resources.state_dir.starts_with(m)),
            "{name}: the state dir {} is on a volume",
            cfg.resources.state_dir.display()
        );
        replicas.push((name.to_string(), cfg, port));
    }
    assert_eq!(replicas.len(), 2, "two tally replicas");
    assert_eq!(
        replicas[0].1.kafka.group, replicas[1].1.kafka.group,
        "one consumer group"
    );
    assert_ne!(
        replicas[0].1.kafka.group_instance_id,
        replicas[1].1.kafka.group_instance_id
    );

    let gen = command(svc("generator"));
    assert_eq!(gen[0], "gen");
    let rate: f64 = gen[gen.iter().position(|a| a == "--rate").unwrap() + 1]
        .parse()
        .unwrap();
    assert!(rate > 0.0 && rate <= 5_000.0, "a modest rate");

    // Prometheus scrapes exactly the replicas, on their HTTP port, and loads the rules.
    let prom = yaml_docs(&root().join("ops/prometheus.yml")).remove(0);
    let job = &at(&prom, &["scrape_configs"])[0];
    assert_eq!(str_at(job, &["metrics_path"]), "/metrics");
    let targets: BTreeSet<String> = at(&job["static_configs"][0], &["targets"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let want: BTreeSet<String> = replicas
        .iter()
        .map(|(n, _, p)| format!("{n}:{p}"))
        .collect();
    assert_eq!(targets, want);

    // Every bind-mounted file exists, and the rule file is the one Prometheus loads.
    let mut mounted = BTreeMap::new();
    for (_, s) in services {
        for v in s
            .get("volumes")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let v = v.as_str().unwrap();
            if let Some(rel) = v.strip_prefix("./") {
                let (host, rest) = rel.split_once(':').unwrap();
                assert!(root().join(host).exists(), "{host} is mounted but missing");
                mounted.insert(
                    rest.split(':').next().unwrap().to_string(),
                    host.to_string(),
                );
            }
        }
    }
    let rule_files: Vec<&str> = at(&prom, &["rule_files"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(!rule_files.is_empty());
    for f in rule_files {
        assert_eq!(
            mounted.get(f).map(String::as_str),
            Some("ops/alerts.yml"),
            "{f}"
        );
    }
    assert_eq!(
        mounted
            .get("/var/lib/grafana/dashboards")
            .map(String::as_str),
        Some("dashboards")
    );
}

/// Metric names a PromQL expression reads.
fn metric_names(expr: &Expr, out: &mut BTreeSet<String>) {
    match expr {
        Expr::VectorSelector(v) => {
            out.insert(v.name.clone().expect("selectors name their metric"));
        }
        Expr::MatrixSelector(m) => {
            out.insert(m.vs.name.clone().expect("selectors name their metric"));
        }
        Expr::Aggregate(a) => {
            metric_names(&a.expr, out);
            if let Some(p) = &a.param {
                metric_names(p, out);
            }
        }
        Expr::Unary(u) => metric_names(&u.expr, out),
        Expr::Binary(b) => {
            metric_names(&b.lhs, out);
            metric_names(&b.rhs, out);
        }
        Expr::Paren(p) => metric_names(&p.expr, out),
        Expr::Subquery(s) => metric_names(&s.expr, out),
        Expr::Call(c) => {
            for a in &c.args.args {
                metric_names(a, out);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) => {}
        other => panic!("unexpected expression {other:?}"),
    }
}

/// Parses a query (dashboard variables replaced by a value) and returns the
/// metrics it reads.
fn query_metrics(q: &str) -> BTreeSet<String> {
    let q = q.replace("$group", "tally");
    let e = parser::parse(&q).unwrap_or_else(|e| panic!("{q}: {e}"));
    let mut out = BTreeSet::new();
    metric_names(&e, &mut out);
    assert!(!out.is_empty(), "{q} reads no metric");
    out
}

/// What a live pod exports: a pod that processed valid, invalid, late and
/// duplicate orders, flushed, and answered an HTTP request.
fn live_metrics() -> String {
    let specs = declared_topics();
    let broker = TestBroker::start(1, &specs);
    let brokers = broker.bootstrap_servers();
    let records = gen::generate(&GenSpec {
        count: 600,
        seed: 3,
        invalid_pct: 5.0,
        duplicate_pct: 5.0,
        late_pct: 5.0,
        ..GenSpec::default()
    });
    produce_input(&brokers, &records);
    let dir = temp_dir("ops-metrics");
    let handle = pod::start(pod_config(&brokers, "ops", dir.clone())).unwrap();
    wait_all_committed(
        &brokers,
        "ops",
        "every offset committed",
        Duration::from_secs(60),
    );
    let state = AppState {
        view: Arc::new(RwLock::new(View::new(0))),
        view_caught_up: Arc::new(AtomicBool::new(true)),
        pods: vec![handle.stats.clone()],
        ready_max_lag: 0,
        metrics: handle.metrics.clone(),
        webhook: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for path in ["/revenue", "/readyz"] {
            app(state.clone())
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
        }
    });
    let text = handle.metrics.render();
    handle.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    text
}

fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

#[test]
fn dashboards_and_alerts_query_only_metrics_that_a_live_pod_exports() {
    let live = exported(&live_metrics());

    // Dashboards: every JSON file, every panel's queries.
    let mut titles = BTreeSet::new();
    let mut files = 0;
    for e in std::fs::read_dir(root().join("dashboards")).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        files += 1;
        let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(d["uid"].is_string() && d["title"].is_string());
        for p in d["panels"].as_array().unwrap() {
            titles.insert(p["title"].as_str().unwrap().to_string());
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{} has no query", p["title"]);
            for t in targets {
                for m in query_metrics(t["expr"].as_str().unwrap()) {
                    assert!(
                        live.contains(&m),
                        "dashboard panel {:?} reads {m}, which tally does not export",
                        p["title"]
                    );
                }
            }
        }
    }
    assert!(files >= 1);
    for want in [
        "Consumer lag per partition",
        "Consumer lag (total)",
        "Consume rate vs produce rate",
        "Estimated time to drain",
        "Events by outcome",
        "Watermark delay per partition",
        "Flush latency",
        "Restore progress",
        "Revenue per currency",
    ] {
        assert!(titles.contains(want), "no panel {want:?}");
    }
    // Provisioning points Grafana at the folder compose mounts the dashboards in.
    let prov = yaml_docs(&root().join("dashboards/provisioning/dashboards/tally.yml")).remove(0);
    assert_eq!(
        str_at(&at(&prov, &["providers"])[0], &["options", "path"]),
        "/var/lib/grafana/dashboards"
    );
    let ds =
        yaml_docs(&root().join("dashboards/provisioning/datasources/prometheus.yml")).remove(0);
    assert_eq!(
        str_at(&at(&ds, &["datasources"])[0], &["uid"]),
        "prometheus"
    );

    // Alert rules: the structure Prometheus requires, and queries that parse.
    let rules = yaml_docs(&root().join("ops/alerts.yml")).remove(0);
    let mut alerts = BTreeSet::new();
    for g in at(&rules, &["groups"]).as_sequence().unwrap() {
        str_at(g, &["name"]);
        for r in at(g, &["rules"]).as_sequence().unwrap() {
            let name = str_at(r, &["alert"]);
            let fr = str_at(r, &["for"]);
            assert!(
                fr.trim_end_matches(['s', 'm', 'h']).parse::<u32>().is_ok(),
                "{name}: for {fr}"
            );
            str_at(r, &["labels", "severity"]);
            str_at(r, &["annotations", "summary"]);
            str_at(r, &["annotations", "description"]);
            for m in query_metrics(str_at(r, &["expr"])) {
                assert!(
                    live.contains(&m),
                    "alert {name} reads {m}, which tally does not export"
                );
            }
            alerts.insert(name.to_string());
        }
    }
    for want in [
        "TallyLagGrowing",
        "TallyNoProgress",
        "TallyDlqRateHigh",
        "TallyPodNotReady",
    ] {
        assert!(alerts.contains(want), "no alert {want}");
    }
}

#[test]
fn every_exported_metric_is_in_the_operations_guide() {
    let guide = std::fs::read_to_string(Path::new(&root()).join("docs/operations.md")).unwrap();
    for name in tally::telemetry::metrics::NAMES {
        assert!(
            guide.contains(&format!("`{name}`")),
            "docs/operations.md's metrics table lacks {name}"
        );
    }
}
