//! The Kubernetes manifests in `deploy/` against what the binary serves and
//! accepts: probe paths and ports, env names and values, the shutdown grace,
//! the autoscaler's bounds. The schema check is `scripts/validate-manifests.sh`
//! (kubernetes-validate, offline); this test checks what schemas cannot.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_yaml::Value;
use support::manifests::{at, pod_config_from_env, root, str_at, yaml_docs};
use tally::serve::http::{app, AppState};
use tally::telemetry::metrics::Metrics;
use tally_core::view::View;
use tower::ServiceExt;

/// Every resource of the kustomization, by kind and name.
fn resources() -> BTreeMap<(String, String), Value> {
    let dir = root().join("deploy");
    let k = &yaml_docs(&dir.join("kustomization.yaml"))[0];
    let listed: Vec<String> = at(k, &["resources"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    // Every manifest in the folder is applied: nothing is silently left out.
    for e in std::fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(
                listed.contains(&name),
                "{name} is not in kustomization.yaml"
            );
        }
    }
    let mut out = BTreeMap::new();
    for f in &listed {
        for doc in yaml_docs(&dir.join(f)) {
            let key = (
                str_at(&doc, &["kind"]).to_string(),
                str_at(&doc, &["metadata", "name"]).to_string(),
            );
            assert!(out.insert(key.clone(), doc).is_none(), "{key:?} twice");
        }
    }
    out
}

fn get<'a>(r: &'a BTreeMap<(String, String), Value>, kind: &str, name: &str) -> &'a Value {
    r.get(&(kind.to_string(), name.to_string()))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn container(sts: &Value) -> &Value {
    &at(sts, &["spec", "template", "spec", "containers"])[0]
}

/// The config the pods run with: the ConfigMap, then the Secret's keys.
fn pod_env(r: &BTreeMap<(String, String), Value>) -> Vec<(String, String)> {
    let mut vars = Vec::new();
    for (k, v) in at(get(r, "ConfigMap", "tally-config"), &["data"])
        .as_mapping()
        .unwrap()
    {
        vars.push((k.as_str().unwrap().into(), v.as_str().unwrap().into()));
    }
    let c = container(get(r, "StatefulSet", "tally"));
    for e in at(c, &["env"]).as_sequence().unwrap() {
        let name = str_at(e, &["name"]).to_string();
        if let Some(key) = e.get("valueFrom").and_then(|v| v.get("secretKeyRef")) {
            let secret = get(r, "Secret", str_at(key, &["name"]));
            let value = str_at(secret, &["stringData", str_at(key, &["key"])]);
            vars.push((name, value.to_string()));
        } else if e.get("valueFrom").and_then(|v| v.get("fieldRef")).is_some() {
            vars.push((name, "tally-0".into()));
        } else {
            vars.push((name, str_at(e, &["value"]).to_string()));
        }
    }
    vars
}

#[test]
fn every_setting_is_a_valid_tally_run_setting() {
    let r = resources();
    let cfg = pod_config_from_env(&pod_env(&r));
    assert_eq!(cfg.kafka.group_instance_id.as_deref(), Some("tally-0"));
    assert!(
        cfg.serving.webhook_secret.is_some(),
        "the webhook secret reaches the pod"
    );
    // Static membership keys on the pod's name, stable in a StatefulSet.
    let c = container(get(&r, "StatefulSet", "tally"));
    let id = at(c, &["env"])
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| str_at(e, &["name"]) == "TALLY_GROUP_INSTANCE_ID")
        .expect("TALLY_GROUP_INSTANCE_ID is set");
    assert_eq!(
        str_at(id, &["valueFrom", "fieldRef", "fieldPath"]),
        "metadata.name"
    );
}

#[tokio::test]
async fn probes_and_ports_match_what_the_binary_serves() {
    let r = resources();
    let cfg = pod_config_from_env(&pod_env(&r));
    let http_port: u16 = cfg
        .serving
        .http
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    let sts = get(&r, "StatefulSet", "tally");
    let c = container(sts);
    let ports: BTreeMap<String, u64> = at(c, &["ports"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                str_at(p, &["name"]).to_string(),
                at(p, &["containerPort"]).as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports.get("http"),
        Some(&(http_port as u64)),
        "containerPort = TALLY_HTTP's port"
    );

    // The paths the probes and the PodMonitor use are routes of the app.
    let state = AppState {
        view: Arc::new(RwLock::new(View::new(0))),
        view_caught_up: Arc::new(AtomicBool::new(true)),
        pods: Vec::new(),
        ready_max_lag: 0,
        metrics: Arc::new(Metrics::new()),
        webhook: None,
    };
    let mut paths = Vec::new();
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let g = at(c, &[probe, "httpGet"]);
        let port = at(g, &["port"]);
        assert!(
            port.as_str() == Some("http") || port.as_u64() == Some(http_port as u64),
            "{probe} port {port:?}"
        );
        paths.push(str_at(g, &["path"]).to_string());
    }
    let pm = get(&r, "PodMonitor", "tally");
    let ep = &at(pm, &["spec", "podMetricsEndpoints"])[0];
    assert_eq!(str_at(ep, &["port"]), "http");
    paths.push(str_at(ep, &["path"]).to_string());
    for path in &paths {
        let resp = app(state.clone())
            .oneshot(Request::get(path.as_str()).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
    }
    assert_eq!(paths[..3], ["/startupz", "/livez", "/readyz"]);

    for svc in ["tally", "tally-headless"] {
        let s = get(&r, "Service", svc);
        for p in at(s, &["spec", "ports"]).as_sequence().unwrap() {
            let target = at(p, &["targetPort"]);
            assert!(
                target.as_str().is_some_and(|n| ports.contains_key(n))
                    || target.as_u64() == Some(http_port as u64),
                "{svc}: targetPort {target:?}"
            );
        }
    }
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().into(), v.as_str().unwrap().into()))
        .collect()
}

fn selects(selector: &Value, pod_labels: &BTreeMap<String, String>) -> bool {
    labels(selector)
        .iter()
        .all(|(k, v)| pod_labels.get(k) == Some(v))
}

#[test]
fn selectors_find_the_pods() {
    let r = resources();
    let sts = get(&r, "StatefulSet", "tally");
    let pod_labels = labels(at(sts, &["spec", "template", "metadata", "labels"]));
    assert!(selects(
        at(sts, &["spec", "selector", "matchLabels"]),
        &pod_labels
    ));
    assert!(selects(
        at(get(&r, "Service", "tally"), &["spec", "selector"]),
        &pod_labels
    ));
    assert_eq!(
        str_at(sts, &["spec", "serviceName"]),
        "tally-headless",
        "the governing Service exists"
    );
    get(&r, "Service", "tally-headless");
    assert!(selects(
        at(
            get(&r, "PodDisruptionBudget", "tally"),
            &["spec", "selector", "matchLabels"]
        ),
        &pod_labels
    ));
    assert!(selects(
        at(
            get(&r, "PodMonitor", "tally"),
            &["spec", "selector", "matchLabels"]
        ),
        &pod_labels
    ));
}

#[test]
fn state_lives_on_a_claim_and_shutdown_fits_the_grace_period() {
    let r = resources();
    let cfg = pod_config_from_env(&pod_env(&r));
    let sts = get(&r, "StatefulSet", "tally");
    let c = container(sts);
    let claim = &at(sts, &["spec", "volumeClaimTemplates"])[0];
    let claim_name = str_at(claim, &["metadata", "name"]);
    let mount = at(c, &["volumeMounts"])
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| str_at(m, &["name"]) == claim_name)
        .expect("the state claim is mounted");
    assert!(
        cfg.resources
            .state_dir
            .starts_with(str_at(mount, &["mountPath"])),
        "TALLY_STATE_DIR {} is on the claim",
        cfg.resources.state_dir.display()
    );
    // Final flush and commit within shutdown_timeout_ms, then leaving the
    // group: the grace period must cover it, with a margin.
    let grace = at(
        sts,
        &["spec", "template", "spec", "terminationGracePeriodSeconds"],
    )
    .as_u64()
    .unwrap();
    assert!(
        grace * 1000 >= cfg.flush.shutdown_timeout_ms + 10_000,
        "grace {grace}s"
    );
    // A memory limit, so RocksDB is sized from it, and requests.
    let limit = str_at(c, &["resources", "limits", "memory"]);
    assert!(limit.ends_with("Gi") || limit.ends_with("Mi"), "{limit}");
    str_at(c, &["resources", "requests", "memory"]);
    // The startup probe leaves room for a restore: at least a minute.
    let sp = at(c, &["startupProbe"]);
    let budget = at(sp, &["periodSeconds"]).as_u64().unwrap()
        * at(sp, &["failureThreshold"]).as_u64().unwrap();
    assert!(budget >= 60, "startup budget {budget}s");
}

/// The declarations compiled into the binary are the repository's
/// `topics/` (the embedded list names every file).
#[test]
fn the_compiled_in_topic_declarations_are_the_directorys() {
    let dir = tally::kafka::topics::load_dir(&root().join("topics")).unwrap();
    assert_eq!(tally::kafka::topics::embedded().unwrap().len(), dir.len());
    assert_eq!(
        tally::kafka::topics::embedded().unwrap(),
        dir,
        "add the new file to EMBEDDED in src/kafka/topics.rs"
    );
}

#[test]
fn autoscaling_follows_the_groups_lag_and_stops_at_the_partition_count() {
    let r = resources();
    let cfg = pod_config_from_env(&pod_env(&r));
    let so = get(&r, "ScaledObject", "tally");
    let target = at(so, &["spec", "scaleTargetRef"]);
    assert_eq!(str_at(target, &["kind"]), "StatefulSet");
    assert_eq!(str_at(target, &["name"]), "tally");
    let partitions = tally::kafka::topics::load_dir(&root().join("topics"))
        .unwrap()
        .into_iter()
        .find(|t| t.name == cfg.topics.input_topic)
        .expect("the input topic is declared")
        .partitions;
    assert_eq!(
        at(so, &["spec", "maxReplicaCount"]).as_i64(),
        Some(partitions as i64),
        "one partition per pod at most"
    );
    let trig = &at(so, &["spec", "triggers"])[0];
    assert_eq!(str_at(trig, &["type"]), "kafka");
    let m = at(trig, &["metadata"]);
    assert_eq!(str_at(m, &["topic"]), cfg.topics.input_topic);
    assert_eq!(str_at(m, &["consumerGroup"]), cfg.kafka.group);
    assert_eq!(str_at(m, &["bootstrapServers"]), cfg.kafka.brokers);
    assert!(str_at(m, &["lagThreshold"]).parse::<u64>().unwrap() > 0);
    assert_eq!(str_at(m, &["allowIdleConsumers"]), "false");
}

#[test]
fn the_operations_guide_documents_the_kubernetes_commands() {
    let guide = std::fs::read_to_string(Path::new(&root()).join("docs/operations.md")).unwrap();
    for needle in [
        "kubectl apply -k deploy/",
        "kubectl -n tally scale statefulset tally",
        "## Run on Kubernetes",
    ] {
        assert!(
            guide.contains(needle),
            "docs/operations.md lacks {needle:?}"
        );
    }
}
