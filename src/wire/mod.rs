//! Effects to Kafka records: the wire format of every output topic.
//!
//! - `enriched-orders`, `orders-late`: the original JSON object with
//!   `currency` and `region` normalised and `amount_usd`, `processed_at` and
//!   `source` added; other fields pass through. Key: `customer_id`.
//! - `orders-dlq`: the original bytes and key, untouched; headers
//!   `reason`, `field`, `detail`, `source_topic`, `source_partition`,
//!   `source_offset`.
//! - `order-alerts`: the enriched order plus `threshold_usd`. Key: `order_id`.
//! - `revenue-windows`: a [`WindowRecord`], keyed by
//!   `window_id|p<partition>`, since every input partition publishes its own
//!   partial aggregate; a retracted session is a tombstone (no value).

use serde_json::{Map, Value};

use crate::config::{LatePolicy, PodConfig};
use tally_core::{
    usd, window_id, EnrichedOrder, FieldSpan, Partition, Rejection, WindowKey, WindowUpdate,
};

pub mod windows;
pub use windows::{WindowRecord, PROGRESS_PREFIX};

/// One record to produce.
#[derive(Clone, Debug, PartialEq)]
pub struct OutRecord {
    pub topic: String,
    /// An explicit partition (the changelog); `None`: by key.
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Where the input record came from.
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: Partition,
    pub offset: i64,
}

/// The enriched JSON: the original object, normalised and extended, with
/// its keys in byte order (the order of a `serde_json::Map`).
///
/// This runs once per accepted order, so it does not build a JSON tree: the
/// passthrough fields are copied as raw text and the added ones are written
/// directly. An object whose keys contain escapes takes the general path
/// ([`enriched_json_tree`]); both give the same JSON value.
///
/// `fields`: the message's fields as the core's one-pass parse listed them
/// ([`tally_core::parse_order_fields`]: sorted, the last of a key given
/// twice), so the message is not parsed again; empty, it is parsed here.
pub fn enriched_json(
    original: &[u8],
    fields: &[FieldSpan],
    o: &EnrichedOrder,
    src: Source<'_>,
) -> Vec<u8> {
    use std::collections::BTreeMap;

    use serde_json::value::RawValue;

    if fields.is_empty() {
        let Ok(map) = serde_json::from_slice::<BTreeMap<&str, &RawValue>>(original) else {
            return enriched_json_tree(original, o, src);
        };
        let fields = map.iter().map(|(k, v)| (*k, v.get().as_bytes()));
        return write_enriched(fields, original.len(), o, src);
    }
    let text = |r: (u32, u32)| original.get(r.0 as usize..r.1 as usize).unwrap_or_default();
    let fields = fields.iter().map(|f| {
        (
            std::str::from_utf8(text(f.key)).unwrap_or_default(),
            text(f.value),
        )
    });
    write_enriched(fields, original.len(), o, src)
}

/// [`enriched_json`]'s writer: the message's fields (`(key, JSON text)`,
/// sorted by key) merged with the added ones. An iterator, not a list, so
/// the hot path (the core's field list) allocates nothing but the output.
fn write_enriched<'a>(
    fields: impl Iterator<Item = (&'a str, &'a [u8])>,
    original_len: usize,
    o: &EnrichedOrder,
    src: Source<'_>,
) -> Vec<u8> {
    use std::io::Write;

    let mut out = Vec::with_capacity(original_len + 200);
    // Writing to a Vec cannot fail, and serialising a str or a number with
    // serde_json cannot either: the results are ignored.
    let put = |out: &mut Vec<u8>, key: &str, value: Added<'_>| {
        out.push(if out.is_empty() { b'{' } else { b',' });
        let _ = serde_json::to_writer(&mut *out, key);
        out.push(b':');
        match value {
            Added::Raw(v) => out.extend_from_slice(v),
            Added::Str(v) => {
                let _ = serde_json::to_writer(&mut *out, v);
            }
            Added::Num(v) => {
                let _ = serde_json::to_writer(&mut *out, &v);
            }
            Added::Time(ms) => {
                out.push(b'"');
                write_rfc3339(ms, out);
                out.push(b'"');
            }
            Added::Source => {
                let _ = write!(
                    out,
                    "{{\"offset\":{},\"partition\":{},\"topic\":",
                    src.offset, src.partition
                );
                let _ = serde_json::to_writer(&mut *out, src.topic);
                out.push(b'}');
            }
        }
    };
    let added: [(&str, Added<'_>); 10] = [
        ("amount", Added::Num(usd(o.order.amount_micros.into()))),
        ("amount_usd", Added::Num(usd(o.amount_usd_micros.into()))),
        ("created_at", Added::Time(o.order.created_at_ms)),
        ("currency", Added::Str(o.order.currency.as_str())),
        ("customer_id", Added::Str(&o.order.customer_id)),
        ("fx_rate", Added::Num(o.rate.as_f64())),
        ("order_id", Added::Str(&o.order.order_id)),
        ("processed_at", Added::Time(o.processed_at_ms)),
        ("region", Added::Str(&o.order.region)),
        ("source", Added::Source),
    ];
    let mut passthrough = fields
        .filter(|(k, _)| !added.iter().any(|(a, _)| a == k))
        .peekable();
    for &(key, value) in &added {
        while let Some((k, v)) = passthrough.next_if(|(k, _)| *k < key) {
            put(&mut out, k, Added::Raw(v));
        }
        put(&mut out, key, value);
    }
    for (k, v) in passthrough {
        put(&mut out, k, Added::Raw(v));
    }
    out.push(b'}');
    out
}

/// A field of the enriched JSON, as it is written.
#[derive(Clone, Copy)]
enum Added<'a> {
    /// A passed-through value's JSON text.
    Raw(&'a [u8]),
    Str(&'a str),
    Num(f64),
    /// Epoch milliseconds, written as RFC 3339 UTC with milliseconds.
    Time(i64),
    /// The input record's coordinates.
    Source,
}

/// The general (and reference) form of [`enriched_json`], through a JSON tree.
pub fn enriched_json_tree(original: &[u8], o: &EnrichedOrder, src: Source<'_>) -> Vec<u8> {
    let mut obj: Map<String, Value> = serde_json::from_slice(original).unwrap_or_default();
    obj.insert("order_id".into(), Value::from(o.order.order_id.clone()));
    obj.insert(
        "customer_id".into(),
        Value::from(o.order.customer_id.clone()),
    );
    obj.insert(
        "amount".into(),
        Value::from(usd(o.order.amount_micros.into())),
    );
    obj.insert("currency".into(), Value::from(o.order.currency.to_string()));
    obj.insert(
        "created_at".into(),
        Value::from(rfc3339(o.order.created_at_ms)),
    );
    obj.insert("region".into(), Value::from(o.order.region.clone()));
    obj.insert(
        "amount_usd".into(),
        Value::from(usd(o.amount_usd_micros.into())),
    );
    obj.insert("fx_rate".into(), Value::from(o.rate.as_f64()));
    obj.insert(
        "processed_at".into(),
        Value::from(rfc3339(o.processed_at_ms)),
    );
    obj.insert(
        "source".into(),
        serde_json::json!({"topic": src.topic, "partition": src.partition, "offset": src.offset}),
    );
    serde_json::to_vec(&obj).unwrap_or_default()
}

/// `rfc3339(ms)` without the allocation and the formatting machinery, for
/// years 0–9999 (every valid order); others go through chrono.
fn write_rfc3339(ms: i64, out: &mut Vec<u8>) {
    use chrono::{Datelike, Timelike};
    let Some(t) = chrono::DateTime::from_timestamp_millis(ms) else {
        return;
    };
    if !(0..=9999).contains(&t.year()) {
        out.extend_from_slice(rfc3339(ms).as_bytes());
        return;
    }
    let digits = |out: &mut Vec<u8>, v: u32, n: u32| {
        for i in (0..n).rev() {
            out.push(b'0' + (v / 10u32.pow(i) % 10) as u8);
        }
    };
    for (value, width, then) in [
        (t.year() as u32, 4, b'-'),
        (t.month(), 2, b'-'),
        (t.day(), 2, b'T'),
        (t.hour(), 2, b':'),
        (t.minute(), 2, b':'),
        (t.second(), 2, b'.'),
        (t.timestamp_subsec_millis(), 3, b'Z'),
    ] {
        digits(out, value, width);
        out.push(then);
    }
}

pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// Records for the outputs of the pod, all addressed by the configured topic names.
pub struct Outputs<'a> {
    pub cfg: &'a PodConfig,
    /// `revenue-windows`' partition count: every row of input partition
    /// `p` goes to partition `p mod n` (see [`windows_partition`]).
    pub windows_partitions: i32,
}

/// The `revenue-windows` partition of every row input partition `p`
/// publishes (partials, session tombstones, progress). One partition per
/// input partition keeps them in the order the pod wrote them, so a reader
/// never sees a progress row before the partials it vouches for (with
/// the default key partitioner, they went to partitions of their own and
/// progress could overtake them). Keys stay the same, so compaction keeps
/// the latest row per key as before.
pub fn windows_partition(p: Partition, windows_partitions: i32) -> i32 {
    p.rem_euclid(windows_partitions.max(1))
}

impl Outputs<'_> {
    pub fn accepted(
        &self,
        original: &[u8],
        fields: &[FieldSpan],
        o: &EnrichedOrder,
        alert: bool,
        src: Source<'_>,
        out: &mut Vec<OutRecord>,
    ) {
        let json = enriched_json(original, fields, o, src);
        if alert {
            out.push(self.alert(&json, o));
        }
        out.push(OutRecord {
            topic: self.cfg.topics.enriched_topic.clone(),
            key: Some(o.order.customer_id.clone().into_bytes()),
            payload: Some(json),
            headers: Vec::new(),
            partition: None,
        });
    }

    pub fn late(
        &self,
        original: &[u8],
        fields: &[FieldSpan],
        o: &EnrichedOrder,
        alert: bool,
        src: Source<'_>,
        out: &mut Vec<OutRecord>,
    ) {
        let json = enriched_json(original, fields, o, src);
        if alert {
            out.push(self.alert(&json, o));
        }
        if self.cfg.job.late_policy == LatePolicy::Topic {
            out.push(OutRecord {
                partition: None,
                topic: self.cfg.topics.late_topic.clone(),
                key: Some(o.order.customer_id.clone().into_bytes()),
                payload: Some(json),
                headers: Vec::new(),
            });
        }
    }

    fn alert(&self, enriched: &[u8], o: &EnrichedOrder) -> OutRecord {
        let mut obj: Map<String, Value> = serde_json::from_slice(enriched).unwrap_or_default();
        obj.insert(
            "threshold_usd".into(),
            Value::from(self.cfg.job.alert_threshold_usd),
        );
        OutRecord {
            partition: None,
            topic: self.cfg.topics.alerts_topic.clone(),
            key: Some(o.order.order_id.clone().into_bytes()),
            payload: Some(serde_json::to_vec(&obj).unwrap_or_default()),
            headers: Vec::new(),
        }
    }

    pub fn rejected(
        &self,
        original: &[u8],
        key: Option<&[u8]>,
        r: &Rejection,
        src: Source<'_>,
        out: &mut Vec<OutRecord>,
    ) {
        let mut headers = vec![
            ("reason".to_string(), r.reason.as_str().as_bytes().to_vec()),
            ("detail".to_string(), r.detail.clone().into_bytes()),
            ("source_topic".to_string(), src.topic.as_bytes().to_vec()),
            (
                "source_partition".to_string(),
                src.partition.to_string().into_bytes(),
            ),
            (
                "source_offset".to_string(),
                src.offset.to_string().into_bytes(),
            ),
        ];
        if let Some(f) = r.field {
            headers.push(("field".to_string(), f.as_bytes().to_vec()));
        }
        // A record over the input limit (`oversize`) can be as large as
        // `raw-orders` allows, and with the headers its copy would not fit
        // a DLQ topic with the same limit: the broker refuses it, and the
        // batch could never be acknowledged. Its copy keeps the first
        // `--max-message-bytes` (64 KiB by default) and says so; the whole
        // record stays at its source offset.
        let limit = self.cfg.limits.max_message_bytes;
        let payload = if original.len() > limit {
            headers.push(("truncated".to_string(), b"true".to_vec()));
            headers.push((
                "original_size".to_string(),
                original.len().to_string().into_bytes(),
            ));
            original[..limit].to_vec()
        } else {
            original.to_vec()
        };
        let key = key.map(|k| {
            if k.len() > limit {
                headers.push(("key_truncated".to_string(), b"true".to_vec()));
                k[..limit].to_vec()
            } else {
                k.to_vec()
            }
        });
        out.push(OutRecord {
            topic: self.cfg.topics.dlq_topic.clone(),
            partition: None,
            key,
            payload: Some(payload),
            headers,
        });
    }

    /// A window's partial, stamped with the writer's ownership `epoch`.
    pub fn window(&self, w: &WindowUpdate, epoch: u64, out: &mut Vec<OutRecord>) {
        let (key, payload) = windows::encode(w, epoch);
        out.push(OutRecord {
            topic: self.cfg.topics.windows_topic.clone(),
            key: Some(key.into_bytes()),
            payload: Some(payload),
            headers: Vec::new(),
            partition: Some(windows_partition(w.partition, self.windows_partitions)),
        });
    }

    /// The tombstone of one partition's partial of a window or session:
    /// a retracted session, or one past its retention.
    pub fn tombstone(
        &self,
        partition: Partition,
        spec_name: &str,
        key: &WindowKey,
        out: &mut Vec<OutRecord>,
    ) {
        out.push(OutRecord {
            topic: self.cfg.topics.windows_topic.clone(),
            key: Some(WindowRecord::record_key(&window_id(spec_name, key), partition).into_bytes()),
            payload: None,
            headers: Vec::new(),
            partition: Some(windows_partition(partition, self.windows_partitions)),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tally_core::order::{parse_order_fields, validate, FxTable, Limits};

    const SRC: Source<'static> = Source {
        topic: "raw-\"orders\"",
        partition: 3,
        offset: 42,
    };

    /// The direct writer's bytes (checked to be the same from the core's
    /// field list as from its own parse) and the tree's.
    fn both(original: &str) -> (Vec<u8>, Vec<u8>) {
        let fx = FxTable::with_defaults();
        let o = validate(
            original.as_bytes(),
            &Limits::default(),
            &fx,
            1_714_564_801_234,
        )
        .expect("a valid order");
        let mut fields = Vec::new();
        parse_order_fields(original.as_bytes(), &Limits::default(), &mut fields)
            .expect("a valid order");
        let own = enriched_json(original.as_bytes(), &[], &o, SRC);
        let listed = enriched_json(original.as_bytes(), &fields, &o, SRC);
        assert_eq!(
            String::from_utf8_lossy(&listed),
            String::from_utf8_lossy(&own),
            "{original}"
        );
        (own, enriched_json_tree(original.as_bytes(), &o, SRC))
    }

    #[test]
    fn the_direct_writer_gives_the_bytes_of_the_tree() {
        for original in [
            r#"{"order_id":"o1","customer_id":"c1","amount":12.34,"currency":"eur","created_at":"2024-05-01T12:00:00Z"}"#,
            r#"{"zeta":{"a":[1,2,{"b":null}]},"order_id":7,"customer_id":99,"amount":"0.10","currency":"Usd","created_at":1714564800,"region":"eu-west","extra":[1,2],"a":true,"fx_rate":"ignored","source":"x"}"#,
            r#"{"order_id":"o\"1\\u00e9","customer_id":"c\n1","amount":1e2,"currency":"JPY","created_at":"1714564800.5","region":""}"#,
            r#"{"b":1,"order_id":"o1","customer_id":"c1","amount":1,"currency":"USD","created_at":1714564800,"b":[2],"a":"x","b":{"c":3}}"#,
        ] {
            let (fast, tree) = both(original);
            assert_eq!(
                String::from_utf8_lossy(&fast),
                String::from_utf8_lossy(&tree),
                "{original}"
            );
        }
    }

    #[test]
    fn keys_with_escapes_take_the_general_path() {
        let original = r#"{"order_id":"o1","customer_id":"c1","amount":1,"currency":"USD","created_at":1714564800,"we\u00efrd":1,"x y":[1, 2]}"#;
        let (fast, tree) = both(original);
        let fast: Value = serde_json::from_slice(&fast).unwrap();
        let tree: Value = serde_json::from_slice(&tree).unwrap();
        assert_eq!(fast, tree);
        assert_eq!(fast["weïrd"], 1);
    }

    #[test]
    fn passthrough_values_keep_their_json_value() {
        // Raw copies keep the original spelling; the value is the same.
        let original = r#"{"order_id":"o1","customer_id":"c1","amount":1,"currency":"USD","created_at":1714564800,"n":1.50,"s":"caf\u00e9","l":[1, 2]}"#;
        let (fast, tree) = both(original);
        let fast: Value = serde_json::from_slice(&fast).unwrap();
        let tree: Value = serde_json::from_slice(&tree).unwrap();
        assert_eq!(fast, tree);
    }

    proptest! {
        #[test]
        fn the_time_writer_agrees_with_chrono(ms in -62_167_219_200_000i64..253_402_300_799_999) {
            let mut out = Vec::new();
            write_rfc3339(ms, &mut out);
            prop_assert_eq!(String::from_utf8(out).unwrap(), rfc3339(ms));
        }

        #[test]
        fn the_direct_writer_agrees_with_the_tree(
            extra in proptest::collection::btree_map("[a-z_]{1,12}", any::<i32>(), 0..6),
            amount in 1u32..10_000_000,
            region in "[a-z\\-\"\\\\]{0,10}",
        ) {
            let mut obj = serde_json::Map::new();
            for (k, v) in &extra {
                obj.insert(k.clone(), Value::from(*v));
            }
            obj.insert("order_id".into(), Value::from("o1"));
            obj.insert("customer_id".into(), Value::from("c1"));
            obj.insert("amount".into(), Value::from(f64::from(amount) / 100.0));
            obj.insert("currency".into(), Value::from("GBP"));
            obj.insert("created_at".into(), Value::from(1_714_564_800));
            obj.insert("region".into(), Value::from(region));
            let original = serde_json::to_string(&obj).unwrap();
            let (fast, tree) = both(&original);
            prop_assert_eq!(fast, tree);
        }
    }
}
