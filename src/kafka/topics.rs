//! Topic declarations (`topics/*.toml`, one file per topic) and applying
//! them to a broker: create what is missing, report drift in what exists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    #[serde(default = "one")]
    pub replication_factor: i32,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

fn one() -> i32 {
    1
}

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("cannot read topic declarations in {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("topic file {file}: {message}")]
    File { file: PathBuf, message: String },
    #[error("Kafka admin: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("topic {0} does not exist and could not be created")]
    Missing(String),
    #[error("cannot start a runtime to apply the topics: {0}")]
    Runtime(std::io::Error),
}

/// Reads every `*.toml` in `dir`, sorted by name.
/// The declarations shipped in `topics/`, compiled into the binary, so
/// tally runs from any working directory. `--topics-dir` overrides them.
/// `tests/deploy.rs` checks that this list is the directory's content.
const EMBEDDED: &[(&str, &str)] = &[
    (
        "enriched-orders.toml",
        include_str!("../../topics/enriched-orders.toml"),
    ),
    ("fx-rates.toml", include_str!("../../topics/fx-rates.toml")),
    (
        "order-alerts.toml",
        include_str!("../../topics/order-alerts.toml"),
    ),
    (
        "orders-dlq.toml",
        include_str!("../../topics/orders-dlq.toml"),
    ),
    (
        "orders-late.toml",
        include_str!("../../topics/orders-late.toml"),
    ),
    (
        "raw-orders.toml",
        include_str!("../../topics/raw-orders.toml"),
    ),
    (
        "revenue-windows.toml",
        include_str!("../../topics/revenue-windows.toml"),
    ),
    (
        "tally-changelog.toml",
        include_str!("../../topics/tally-changelog.toml"),
    ),
];

/// The compiled-in declarations, or those of `dir` when given.
pub fn load(dir: Option<&Path>) -> Result<Vec<TopicSpec>, TopicError> {
    match dir {
        Some(d) => load_dir(d),
        None => embedded(),
    }
}

/// The compiled-in declarations.
pub fn embedded() -> Result<Vec<TopicSpec>, TopicError> {
    EMBEDDED
        .iter()
        .map(|(name, text)| parse_spec(Path::new("(compiled in) topics").join(name), text))
        .collect()
}

pub fn load_dir(dir: &Path) -> Result<Vec<TopicSpec>, TopicError> {
    let rd = std::fs::read_dir(dir).map_err(|source| TopicError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let mut specs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| TopicError::File {
            file: file.clone(),
            message: e.to_string(),
        })?;
        specs.push(parse_spec(file, &text)?);
    }
    Ok(specs)
}

fn parse_spec(file: PathBuf, text: &str) -> Result<TopicSpec, TopicError> {
    let err = |message: String| TopicError::File {
        file: file.clone(),
        message,
    };
    let spec: TopicSpec = toml::from_str(text).map_err(|e| err(e.to_string()))?;
    if spec.partitions < 1 {
        return Err(err("partitions must be ≥ 1".into()));
    }
    if spec.replication_factor < 1 {
        return Err(err("replication_factor must be ≥ 1".into()));
    }
    Ok(spec)
}

/// What `apply` found for one topic.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TopicStatus {
    Created,
    Matches,
    /// Exists, but differs from its declaration (the message says how).
    Drift(String),
    /// The broker refused to create it (the message says why).
    NotCreated(String),
}

fn client_config(brokers: &str, extra: &[(String, String)]) -> ClientConfig {
    super::Clients::new(brokers, extra).config(&[])
}

/// Partition count of every topic on the broker.
pub fn existing(
    brokers: &str,
    extra: &[(String, String)],
) -> Result<BTreeMap<String, i32>, TopicError> {
    let consumer: BaseConsumer = client_config(brokers, extra).create()?;
    let md = consumer.fetch_metadata(None, Duration::from_secs(10))?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect())
}

/// [`apply`] from synchronous code, inside a runtime or not: it runs on a
/// thread of its own with a runtime of its own.
pub fn apply_blocking(
    brokers: &str,
    extra: &[(String, String)],
    specs: &[TopicSpec],
) -> Result<Vec<(String, TopicStatus)>, TopicError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(TopicError::Runtime)?
                .block_on(apply(brokers, extra, specs))
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The declared configs of the existing topics `specs` that differ on the
/// broker, by topic: `key is X, declared Y`. Empty where the broker cannot
/// describe configs (librdkafka's mock cluster and tansu lack
/// DescribeConfigs): partition counts are still compared.
async fn config_drift(
    admin: &AdminClient<DefaultClientContext>,
    specs: &[&TopicSpec],
) -> BTreeMap<String, Vec<String>> {
    let mut drift = BTreeMap::new();
    let wanted: Vec<&&TopicSpec> = specs.iter().filter(|s| !s.config.is_empty()).collect();
    if wanted.is_empty() {
        return drift;
    }
    let resources: Vec<ResourceSpecifier<'_>> = wanted
        .iter()
        .map(|s| ResourceSpecifier::Topic(&s.name))
        .collect();
    // Short: a broker without DescribeConfigs never answers it, and the
    // pod applies its topics at every start; a real broker answers in
    // milliseconds.
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(3)));
    let results = match admin.describe_configs(resources.iter(), &opts).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(error = %e, "the broker did not describe topic configs; config drift is not checked");
            return drift;
        }
    };
    for (s, r) in wanted.iter().zip(results) {
        let Ok(resource) = r else { continue };
        let on_broker = resource.entry_map();
        for (k, v) in &s.config {
            let actual = on_broker.get(k.as_str()).and_then(|e| e.value.as_deref());
            if actual != Some(v.as_str()) {
                drift
                    .entry(s.name.clone())
                    .or_insert_with(Vec::new)
                    .push(format!(
                        "{k} is {}, declared {v}",
                        actual.unwrap_or("unset")
                    ));
            }
        }
    }
    drift
}

/// Creates the missing topics and compares the rest with their
/// declarations: partition counts, and every declared config where the
/// broker can describe them.
pub async fn apply(
    brokers: &str,
    extra: &[(String, String)],
    specs: &[TopicSpec],
) -> Result<Vec<(String, TopicStatus)>, TopicError> {
    let have = existing(brokers, extra)?;
    let admin: AdminClient<DefaultClientContext> = client_config(brokers, extra).create()?;
    let mut report = Vec::new();
    let missing: Vec<&TopicSpec> = specs
        .iter()
        .filter(|s| !have.contains_key(&s.name))
        .collect();
    let present: Vec<&TopicSpec> = specs
        .iter()
        .filter(|s| have.contains_key(&s.name))
        .collect();
    let configs = config_drift(&admin, &present).await;
    for s in present {
        let n = have[&s.name];
        let mut what = Vec::new();
        if n != s.partitions {
            what.push(format!("{n} partitions, declared {}", s.partitions));
        }
        what.extend(configs.get(&s.name).into_iter().flatten().cloned());
        let status = if what.is_empty() {
            TopicStatus::Matches
        } else {
            TopicStatus::Drift(what.join("; "))
        };
        report.push((s.name.clone(), status));
    }
    if !missing.is_empty() {
        let new: Vec<NewTopic> = missing
            .iter()
            .map(|s| {
                let mut t = NewTopic::new(
                    &s.name,
                    s.partitions,
                    TopicReplication::Fixed(s.replication_factor),
                );
                for (k, v) in &s.config {
                    t = t.set(k, v);
                }
                t
            })
            .collect();
        // Bounded: some Kafka-compatible brokers never answer CreateTopics.
        let opts = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(10)))
            .request_timeout(Some(Duration::from_secs(10)));
        match admin.create_topics(new.iter(), &opts).await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(name) => report.push((name, TopicStatus::Created)),
                        Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                            report.push((name, TopicStatus::Matches))
                        }
                        Err((name, code)) => {
                            report.push((name, TopicStatus::NotCreated(code.to_string())))
                        }
                    }
                }
            }
            Err(e) => {
                for s in missing {
                    report.push((s.name.clone(), TopicStatus::NotCreated(e.to_string())));
                }
            }
        }
    }
    report.sort();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_declarations_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("topics");
        let specs = load_dir(&dir).unwrap();
        let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
        for t in [
            "raw-orders",
            "enriched-orders",
            "orders-dlq",
            "orders-late",
            "revenue-windows",
            "fx-rates",
            "order-alerts",
        ] {
            assert!(names.contains(&t), "{t} is not declared");
        }
        let windows = specs.iter().find(|s| s.name == "revenue-windows").unwrap();
        assert_eq!(windows.config["cleanup.policy"], "compact");
    }

    #[test]
    fn a_bad_file_names_itself() {
        let dir = std::env::temp_dir().join(format!("tally-topics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("x.toml"), "name = \"x\"\npartitions = 0\n").unwrap();
        let e = load_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("x.toml") && e.contains("partitions"), "{e}");
        std::fs::write(dir.join("x.toml"), "name = \"x\"\npartitons = 3\n").unwrap();
        let e = load_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("partitons"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
