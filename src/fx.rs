//! The FX table adapter: reads the compacted `fx-rates` topic to its end at
//! startup (seeding it from the defaults when it is empty), then follows it.
//!
//! Rates are versioned by event time (`FxTable`): an order converts at the
//! rate in force at its `created_at`. A record's key is the currency,
//! optionally followed by `@` and the time the rate is in force from
//! (`EUR@2024-05-01T00:00:00Z`, or epoch seconds or milliseconds); its
//! value is a rate, a bare JSON number or an object with a `rate` field and
//! optionally `valid_from` (the same time; it must agree with the key's).
//! Keying each version by its time is what lets compaction keep every
//! version, so a restore or a replay months later sees the same table. A
//! rate with no time (the old format) is in force from the start. A
//! tombstone removes the version its key names.

use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

use crate::kafka::Clients;
use tally_core::{parse_time, Currency, FxTable, FxUpdate, Rate, FROM_START};

#[derive(Debug, thiserror::Error)]
pub enum FxError {
    #[error("FX defaults file {path}: {message}")]
    Defaults { path: String, message: String },
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("topic {0} does not exist")]
    NoTopic(String),
    #[error("timed out reading {0} to its end")]
    Timeout(String),
}

/// Parses one `fx-rates` record into the version it sets or removes.
pub fn parse_record(key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<FxUpdate, String> {
    let key = key.ok_or("no key")?;
    let key = std::str::from_utf8(key).map_err(|_| "key is not UTF-8".to_string())?;
    let (code, key_time) = match key.split_once('@') {
        Some((c, t)) => (
            c,
            Some(parse_time(t).ok_or_else(|| {
                format!("{t:?} (after the key's @) is neither RFC 3339 nor an epoch number")
            })?),
        ),
        None => (key, None),
    };
    let currency =
        Currency::parse(code.trim()).ok_or_else(|| format!("{code:?} is not a currency"))?;
    let Some(payload) = payload else {
        return Ok(FxUpdate::Remove {
            currency,
            from_ms: key_time.unwrap_or(FROM_START),
        });
    };
    let v: Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
    let (x, value_time) = match &v {
        Value::Number(n) => (n.as_f64(), None),
        Value::Object(o) => {
            let t = match o.get("valid_from") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(parse_time(s).ok_or_else(|| {
                    format!("valid_from {s:?} is neither RFC 3339 nor an epoch number")
                })?),
                Some(Value::Number(n)) => Some(
                    n.as_f64()
                        .and_then(|x| parse_time(&x.to_string()))
                        .ok_or_else(|| format!("valid_from {n} is not a time"))?,
                ),
                Some(other) => return Err(format!("valid_from {other} is not a time")),
            };
            (o.get("rate").and_then(Value::as_f64), t)
        }
        _ => (None, None),
    };
    let x = x.ok_or("no numeric rate")?;
    let rate = Rate::from_f64(x).ok_or_else(|| format!("{x} is not a positive rate"))?;
    let from_ms = match (key_time, value_time) {
        (Some(k), Some(v)) if k != v => {
            return Err(format!(
                "the key's time ({k} ms) and valid_from ({v} ms) disagree"
            ))
        }
        (k, v) => k.or(v).unwrap_or(FROM_START),
    };
    Ok(FxUpdate::Set {
        currency,
        from_ms,
        rate,
    })
}

/// The default table: built in, or from a TOML file of `CUR = rate` lines.
pub fn defaults(path: Option<&Path>) -> Result<FxTable, FxError> {
    let Some(path) = path else {
        return Ok(FxTable::with_defaults());
    };
    let err = |message: String| FxError::Defaults {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
    let mut fx = FxTable::empty();
    for (k, v) in table {
        let c = Currency::parse(&k).ok_or_else(|| err(format!("{k:?} is not a currency")))?;
        let x = v
            .as_float()
            .or_else(|| v.as_integer().map(|i| i as f64))
            .ok_or_else(|| err(format!("{k}: rate must be a number")))?;
        let r = Rate::from_f64(x).ok_or_else(|| err(format!("{k}: {x} is not a positive rate")))?;
        fx.set(c, r);
    }
    Ok(fx)
}

/// Follows `fx-rates` after the initial load.
pub struct FxFollower {
    consumer: BaseConsumer,
    /// Records that could not be used (logged, never fatal).
    pub invalid: u64,
}

fn base_config(brokers: &str, extra: &[(String, String)]) -> ClientConfig {
    Clients::new(brokers, extra).reader("tally-fx-reader")
}

/// Loads the table: the topic's content over the defaults. If the topic is
/// empty, the defaults are produced to it first.
pub fn bootstrap(
    brokers: &str,
    extra: &[(String, String)],
    topic: &str,
    defaults: &FxTable,
    timeout: Duration,
) -> Result<(FxTable, FxFollower), FxError> {
    let consumer: BaseConsumer = base_config(brokers, extra).create()?;
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(FxError::NoTopic(topic.to_string()));
    }
    let mut tpl = TopicPartitionList::new();
    let mut ends = Vec::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
        let (_, high) = consumer.fetch_watermarks(topic, *p, timeout)?;
        ends.push((*p, high));
    }
    consumer.assign(&tpl)?;
    let mut fx = defaults.clone();
    let mut follower = FxFollower {
        consumer,
        invalid: 0,
    };
    if ends.iter().all(|(_, h)| *h == 0) {
        seed(brokers, extra, topic, defaults, timeout)?;
        return Ok((fx, follower));
    }
    let deadline = Instant::now() + timeout;
    let mut pos: std::collections::HashMap<i32, i64> = partitions.iter().map(|p| (*p, 0)).collect();
    while ends.iter().any(|(p, h)| pos[p] < *h) {
        if Instant::now() > deadline {
            return Err(FxError::Timeout(topic.to_string()));
        }
        if let Some(Ok(m)) = follower.consumer.poll(Duration::from_millis(100)) {
            pos.insert(m.partition(), m.offset() + 1);
            let (k, p) = (m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec));
            drop(m);
            follower.apply(k.as_deref(), p.as_deref(), &mut fx);
        }
    }
    Ok((fx, follower))
}

fn seed(
    brokers: &str,
    extra: &[(String, String)],
    topic: &str,
    fx: &FxTable,
    timeout: Duration,
) -> Result<(), FxError> {
    let producer: BaseProducer = Clients::new(brokers, extra).producer().create()?;
    for (cur, from_ms, rate) in fx.versions() {
        let key = if from_ms == FROM_START {
            cur.to_string()
        } else {
            format!("{cur}@{from_ms}")
        };
        let mut v = serde_json::json!({ "currency": cur.to_string(), "rate": rate.as_f64() });
        if from_ms != FROM_START {
            v["valid_from"] = from_ms.into();
        }
        let payload = v.to_string();
        producer
            .send(BaseRecord::to(topic).key(&key).payload(&payload))
            .map_err(|(e, _)| e)?;
    }
    producer.flush(timeout)?;
    Ok(())
}

impl FxFollower {
    fn parse(&mut self, key: Option<&[u8]>, payload: Option<&[u8]>) -> Option<FxUpdate> {
        match parse_record(key, payload) {
            Ok(u) => Some(u),
            Err(e) => {
                self.invalid += 1;
                tracing::warn!(error = %e, "ignoring an unusable fx-rates record");
                None
            }
        }
    }

    fn apply(&mut self, key: Option<&[u8]>, payload: Option<&[u8]>, fx: &mut FxTable) {
        if let Some(u) = self.parse(key, payload) {
            fx.apply(u);
        }
    }

    /// Every update available now, without waiting, in the topic's order.
    pub fn poll_updates(&mut self) -> Vec<FxUpdate> {
        let mut out = Vec::new();
        while let Some(r) = self.consumer.poll(Duration::ZERO) {
            if let Ok(m) = r {
                let (k, p) = (m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec));
                drop(m);
                out.extend(self.parse(k.as_deref(), p.as_deref()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_as_number_object_or_tombstone() {
        let eur = Currency::parse("EUR").unwrap();
        let set = |from_ms, x| FxUpdate::Set {
            currency: eur,
            from_ms,
            rate: Rate::from_f64(x).unwrap(),
        };
        assert_eq!(
            parse_record(Some(b"eur"), Some(b"1.1")).unwrap(),
            set(FROM_START, 1.1)
        );
        let u = parse_record(Some(b"GBP"), Some(br#"{"currency":"GBP","rate":1.25}"#)).unwrap();
        assert!(
            matches!(u, FxUpdate::Set { from_ms: FROM_START, rate, .. } if rate == Rate::from_f64(1.25).unwrap())
        );
        assert!(matches!(
            parse_record(Some(b"JPY"), None).unwrap(),
            FxUpdate::Remove {
                from_ms: FROM_START,
                ..
            }
        ));
        assert!(parse_record(None, Some(b"1")).is_err());
        assert!(parse_record(Some(b"EUR"), Some(b"-1")).is_err());
        assert!(parse_record(Some(b"EURO"), Some(b"1")).is_err());
    }

    /// A version's time comes from the key (what compaction keeps apart)
    /// or from `valid_from`; both must agree; a tombstone names its version.
    #[test]
    fn versions_are_keyed_by_their_time() {
        let t = 1_714_564_800_000; // 2024-05-01T12:00:00Z
        let eur = Currency::parse("EUR").unwrap();
        let want = FxUpdate::Set {
            currency: eur,
            from_ms: t,
            rate: Rate::from_f64(1.1).unwrap(),
        };
        assert_eq!(
            parse_record(Some(b"EUR@2024-05-01T12:00:00Z"), Some(b"1.1")).unwrap(),
            want
        );
        assert_eq!(
            parse_record(
                Some(b"EUR"),
                Some(br#"{"rate":1.1,"valid_from":"2024-05-01T12:00:00Z"}"#)
            )
            .unwrap(),
            want
        );
        assert_eq!(
            parse_record(
                Some(b"EUR@1714564800000"),
                Some(br#"{"rate":1.1,"valid_from":1714564800}"#)
            )
            .unwrap(),
            want
        );
        let e = parse_record(
            Some(b"EUR@2024-05-02T00:00:00Z"),
            Some(br#"{"rate":1.1,"valid_from":"2024-05-01T12:00:00Z"}"#),
        )
        .unwrap_err();
        assert!(e.contains("disagree"), "{e}");
        assert!(parse_record(Some(b"EUR@yesterday"), Some(b"1.1"))
            .unwrap_err()
            .contains("yesterday"));
        assert_eq!(
            parse_record(Some(b"EUR@1714564800000"), None).unwrap(),
            FxUpdate::Remove {
                currency: eur,
                from_ms: t
            }
        );
    }

    #[test]
    fn a_defaults_file_is_checked() {
        let dir = std::env::temp_dir().join(format!("tally-fx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("fx.toml");
        std::fs::write(&f, "USD = 1\nEUR = 1.1\n").unwrap();
        assert_eq!(defaults(Some(&f)).unwrap().len(), 2);
        std::fs::write(&f, "USD = \"one\"\n").unwrap();
        assert!(defaults(Some(&f))
            .unwrap_err()
            .to_string()
            .contains("fx.toml"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
