//! The load generator: deterministic order streams with a known truth.
//!
//! [`generate`] is pure: a seed and a [`GenSpec`] give the same records and
//! the same [`Truth`] every time. [`produce`] sends them to any broker, at a
//! fixed rate or as fast as possible.
//!
//! The stream's event times advance by `1000 / rate` ms per order (10 ms
//! when unthrottled) from `start_ms`, each moved back by up to `disorder_ms`.
//! Keep `disorder_ms` within the pod's allowed out-of-orderness and every
//! valid order counts. Special records, by percentage:
//! - invalid: one of several malformed shapes, with the reason expected;
//! - duplicate: the exact key and bytes of a recent valid order, again;
//! - very late: a customer already seen, with an event time 3 h in the
//!   past, so every window it belongs to has closed on its partition.

use std::io::Write;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde::{Deserialize, Serialize};

use crate::kafka::Clients;
use tally_core::order::{usd_micros, MICROS};
use tally_core::{Currency, FxTable, Reason};

#[derive(Clone, Debug, PartialEq)]
pub struct GenSpec {
    pub count: u64,
    /// Orders per second; 0 = as fast as possible.
    pub rate: f64,
    pub seed: u64,
    pub customers: u64,
    /// Event time of the first order, ms.
    pub start_ms: i64,
    pub disorder_ms: i64,
    pub invalid_pct: f64,
    pub duplicate_pct: f64,
    pub late_pct: f64,
}

impl Default for GenSpec {
    fn default() -> Self {
        GenSpec {
            count: 10_000,
            rate: 0.0,
            seed: 1,
            customers: 1_000,
            start_ms: 1_700_000_000_000,
            disorder_ms: 2_000,
            invalid_pct: 1.0,
            duplicate_pct: 1.0,
            late_pct: 0.5,
        }
    }
}

/// What one generated record is, and what tally must make of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Expect {
    Valid {
        order_id: String,
        customer_id: String,
        currency: String,
        region: String,
        amount_micros: i64,
        usd_micros: i64,
        created_at_ms: i64,
    },
    Invalid {
        reason: Reason,
    },
    Duplicate {
        order_id: String,
    },
    Late {
        order_id: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct GenRecord {
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub expect: Expect,
}

const CURRENCIES: [&str; 6] = ["USD", "EUR", "GBP", "JPY", "CAD", "AUD"];
const REGIONS: [&str; 4] = ["eu", "us", "apac", "latam"];

/// SplitMix64: small, fast and stable across versions, so a seed always
/// means the same stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pct(&mut self, p: f64) -> bool {
        (self.next() % 1_000_000) as f64 / 10_000.0 < p
    }
}

/// Event time between consecutive orders: `1000 / rate` ms, so event time
/// keeps pace with the wall clock; 10 ms when unthrottled.
pub fn step_ms(rate: f64) -> f64 {
    if rate > 0.0 {
        1000.0 / rate
    } else {
        10.0
    }
}

/// Generates the stream for `spec`. Valid orders use the default FX table.
pub fn generate(spec: &GenSpec) -> Vec<GenRecord> {
    let fx = FxTable::with_defaults();
    let mut rng = Rng(spec.seed);
    let step = step_ms(spec.rate);
    let mut out: Vec<GenRecord> = Vec::with_capacity(spec.count as usize);
    let mut recent_valid: Vec<usize> = Vec::new();
    for i in 0..spec.count {
        let t = spec.start_ms + (i as f64 * step) as i64
            - rng.below(spec.disorder_ms.max(0) as u64 + 1) as i64;
        let customer = format!("c{}", rng.below(spec.customers));
        let roll = rng.next() % 1_000_000;
        let pct = |p: f64| (p * 10_000.0) as u64;
        let (inv, dup, late) = (
            pct(spec.invalid_pct),
            pct(spec.duplicate_pct),
            pct(spec.late_pct),
        );
        if roll < inv {
            out.push(invalid(&mut rng, i, &customer, t));
        } else if roll < inv + dup && !recent_valid.is_empty() {
            let j = recent_valid[rng.below(recent_valid.len() as u64) as usize];
            let orig = out[j].clone();
            let Expect::Valid { order_id, .. } = &orig.expect else {
                continue;
            };
            out.push(GenRecord {
                key: orig.key.clone(),
                payload: orig.payload.clone(),
                expect: Expect::Duplicate {
                    order_id: order_id.clone(),
                },
            });
        } else if roll < inv + dup + late && !recent_valid.is_empty() {
            let j = recent_valid[rng.below(recent_valid.len() as u64) as usize];
            let Expect::Valid { customer_id, .. } = &out[j].expect else {
                continue;
            };
            let customer_id = customer_id.clone();
            let id = format!("late-{}-{i}", spec.seed);
            let json = format!(
                r#"{{"order_id":"{id}","customer_id":"{customer_id}","amount":12.5,"currency":"USD","created_at":{}}}"#,
                t - 3 * 3_600_000
            );
            out.push(GenRecord {
                key: customer_id.into_bytes(),
                payload: json.into_bytes(),
                expect: Expect::Late { order_id: id },
            });
        } else {
            let currency = CURRENCIES[rng.below(CURRENCIES.len() as u64) as usize];
            let region = REGIONS[rng.below(REGIONS.len() as u64) as usize];
            // Mostly 1.00 to 500.00; one in a hundred is a big order.
            let cents = if rng.pct(1.0) {
                500_000 + rng.below(2_000_000)
            } else {
                100 + rng.below(49_900)
            } as i64;
            let amount_micros = cents * (MICROS / 100);
            let cur =
                Currency::parse(currency).unwrap_or_else(|| unreachable!("constant currency"));
            let rate = fx
                .get(cur)
                .unwrap_or_else(|| unreachable!("default currencies have rates"));
            let id = format!("o-{}-{i}", spec.seed);
            let amount = format!("{}.{:02}", cents / 100, cents % 100);
            // Vary the accepted shapes: string amounts, epoch seconds, lower-case currency.
            let json = match i % 4 {
                0 => format!(
                    r#"{{"order_id":"{id}","customer_id":"{customer}","amount":{amount},"currency":"{currency}","created_at":{t},"region":"{region}","channel":"web"}}"#
                ),
                1 => format!(
                    r#"{{"order_id":"{id}","customer_id":"{customer}","amount":"{amount}","currency":"{}","created_at":"{}","region":"{region}"}}"#,
                    currency.to_lowercase(),
                    crate::wire::rfc3339(t)
                ),
                2 => format!(
                    r#"{{"order_id":"{id}","customer_id":"{customer}","amount":{amount},"currency":"{currency}","created_at":{}.{:03},"region":"{region}"}}"#,
                    t / 1000,
                    t % 1000
                ),
                _ => format!(
                    r#"{{"order_id":"{id}","customer_id":"{customer}","amount":{amount},"currency":"{currency}","created_at":{t},"region":"{region}"}}"#
                ),
            };
            recent_valid.push(out.len());
            if recent_valid.len() > 200 {
                recent_valid.remove(0);
            }
            out.push(GenRecord {
                key: customer.clone().into_bytes(),
                payload: json.into_bytes(),
                expect: Expect::Valid {
                    order_id: id,
                    customer_id: customer,
                    currency: currency.to_string(),
                    region: region.to_string(),
                    amount_micros,
                    usd_micros: usd_micros(amount_micros, rate)
                        .expect("generated amounts are far below the bound"),
                    created_at_ms: t,
                },
            });
        }
    }
    out
}

fn invalid(rng: &mut Rng, i: u64, customer: &str, t: i64) -> GenRecord {
    let id = format!("bad-{i}");
    let (payload, reason) = match rng.below(6) {
        0 => (
            format!("{{\"order_id\":\"{id}\",\"amount\":"),
            Reason::NotJson,
        ),
        1 => (
            format!(r#"{{"order_id":"{id}","amount":5,"currency":"USD","created_at":{t}}}"#),
            Reason::MissingField,
        ),
        2 => (
            format!(
                r#"{{"order_id":"{id}","customer_id":"{customer}","amount":-5,"currency":"USD","created_at":{t}}}"#
            ),
            Reason::NonPositiveAmount,
        ),
        3 => (
            format!(
                r#"{{"order_id":"{id}","customer_id":"{customer}","amount":5,"currency":"XXX","created_at":{t}}}"#
            ),
            Reason::UnknownCurrency,
        ),
        4 => (
            format!(
                r#"{{"order_id":"{id}","customer_id":"{customer}","amount":5,"currency":"USD","created_at":"1990-01-01T00:00:00Z"}}"#
            ),
            Reason::TimestampOutOfRange,
        ),
        _ => (
            format!(
                r#"{{"order_id":"{id}","customer_id":"{customer}","amount":[5],"currency":"USD","created_at":{t}}}"#
            ),
            Reason::WrongType,
        ),
    };
    GenRecord {
        key: customer.as_bytes().to_vec(),
        payload: payload.into_bytes(),
        expect: Expect::Invalid { reason },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GenError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Generates and sends in chunks of 10,000 (so `count = 0` runs until
/// `stop`), calling `on_chunk` with what each chunk sent. Event time keeps
/// advancing across chunks.
pub fn stream(
    brokers: &str,
    topic: &str,
    spec: GenSpec,
    stop: &dyn Fn() -> bool,
    on_chunk: &mut dyn FnMut(&[GenRecord]) -> std::io::Result<()>,
) -> Result<u64, GenError> {
    const CHUNK: u64 = 10_000;
    let (mut sent, mut chunk) = (0u64, 0u64);
    let step = step_ms(spec.rate);
    while !stop() && (spec.count == 0 || sent < spec.count) {
        let n = if spec.count == 0 {
            CHUNK
        } else {
            CHUNK.min(spec.count - sent)
        };
        let part = GenSpec {
            count: n,
            seed: spec.seed.wrapping_mul(1_000_003).wrapping_add(chunk),
            start_ms: spec.start_ms + (sent as f64 * step) as i64,
            ..spec.clone()
        };
        let records = generate(&part);
        let k = produce(brokers, topic, &[], &records, spec.rate, stop)?;
        on_chunk(&records[..k as usize])?;
        sent += k;
        chunk += 1;
    }
    Ok(sent)
}

/// Writes the truth as JSON lines, one per record, in send order.
pub fn write_truth(records: &[GenRecord], w: &mut impl Write) -> std::io::Result<()> {
    for r in records {
        serde_json::to_writer(&mut *w, &r.expect)?;
        w.write_all(b"\n")?;
    }
    Ok(())
}

/// Sends one record, serving delivery reports while librdkafka's queue is
/// full instead of failing.
pub fn send_waiting(
    producer: &BaseProducer,
    topic: &str,
    partition: Option<i32>,
    key: &[u8],
    payload: Option<&[u8]>,
) -> Result<(), KafkaError> {
    loop {
        let mut r = BaseRecord::<[u8], [u8]>::to(topic).key(key);
        if let Some(p) = partition {
            r = r.partition(p);
        }
        if let Some(v) = payload {
            r = r.payload(v);
        }
        match producer.send(r) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                producer.poll(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Waits for a paced send's time, then serves the delivery reports so far.
///
/// Not `producer.poll(due - now)`: rdkafka's `BaseProducer::poll(t)` runs
/// for the whole of `t` and waits in whole milliseconds, so under 1 ms it
/// polls without blocking. A load generator paced that way spun between
/// its sends (0.6 of a core at 3,600 orders/s, per thread run times from
/// `/proc/<pid>/task/*/schedstat`) and took that CPU from the broker and
/// the job it was measuring on the same two cores.
pub fn pace_until<C: rdkafka::producer::ProducerContext>(producer: &BaseProducer<C>, due: Instant) {
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
    producer.poll(Duration::ZERO);
}

/// Collects the records librdkafka gave up on (by index in the stream).
#[derive(Default)]
struct Undelivered(std::sync::Mutex<Vec<(usize, KafkaError)>>);

impl rdkafka::ClientContext for Undelivered {}

impl rdkafka::producer::ProducerContext for Undelivered {
    type DeliveryOpaque = Box<usize>;

    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, i: Box<usize>) {
        if let Err((e, _)) = result {
            if let Ok(mut v) = self.0.lock() {
                v.push((*i, e.clone()));
            }
        }
    }
}

/// Sends the records, paced at `rate` per second (0 = unthrottled), and
/// returns how many were sent before `stop` said so. Every one of them is
/// on the topic when this returns: a record librdkafka gives up on (a
/// produce error it does not retry, a timeout while brokers are down) is
/// sent again, up to five times, after the others; the truth's order then
/// differs from the log's by those few records. Otherwise they would be
/// lost without a word while a test counted them in its truth.
pub fn produce(
    brokers: &str,
    topic: &str,
    extra: &[(String, String)],
    records: &[GenRecord],
    rate: f64,
    stop: &dyn Fn() -> bool,
) -> Result<u64, KafkaError> {
    let producer: BaseProducer<Undelivered> = Clients::new(brokers, extra)
        .config(&[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", "5"),
        ])
        .create_with_context(Undelivered::default())?;
    let send = |i: usize| -> Result<(), KafkaError> {
        let r = &records[i];
        let mut opaque = Box::new(i);
        loop {
            let rec = BaseRecord::<[u8], [u8], Box<usize>>::with_opaque_to(topic, opaque)
                .key(&r.key)
                .payload(&r.payload);
            match producer.send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), rec)) => {
                    opaque = rec.delivery_opaque;
                    producer.poll(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e),
            }
        }
    };
    let started = Instant::now();
    let mut sent = 0u64;
    for (i, _) in records.iter().enumerate() {
        if stop() {
            break;
        }
        if rate > 0.0 {
            pace_until(
                &producer,
                started + Duration::from_secs_f64(sent as f64 / rate),
            );
        }
        send(i)?;
        sent += 1;
        producer.poll(Duration::ZERO);
    }
    for attempt in 0.. {
        producer.flush(Duration::from_secs(60))?;
        let failed = std::mem::take(&mut *producer.context().0.lock().expect("not poisoned"));
        if failed.is_empty() {
            break;
        }
        if attempt == 5 {
            return Err(failed[0].1.clone());
        }
        for (i, e) in failed {
            tracing::warn!(record = i, error = %e, "a generated record was not delivered; sending it again");
            send(i)?;
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::{validate, Limits};

    #[test]
    fn the_stream_is_deterministic_and_its_truth_holds() {
        let spec = GenSpec {
            count: 2_000,
            invalid_pct: 5.0,
            duplicate_pct: 5.0,
            late_pct: 2.0,
            ..GenSpec::default()
        };
        let a = generate(&spec);
        assert_eq!(a, generate(&spec));
        let fx = FxTable::with_defaults();
        let mut kinds = [0; 4];
        for r in &a {
            let v = validate(&r.payload, &Limits::default(), &fx, 0);
            match &r.expect {
                Expect::Valid {
                    usd_micros,
                    order_id,
                    ..
                } => {
                    let o = v.unwrap();
                    assert_eq!(
                        (&o.order.order_id, o.amount_usd_micros),
                        (order_id, *usd_micros)
                    );
                    kinds[0] += 1;
                }
                Expect::Invalid { reason } => {
                    assert_eq!(
                        v.unwrap_err().reason,
                        *reason,
                        "{}",
                        String::from_utf8_lossy(&r.payload)
                    );
                    kinds[1] += 1;
                }
                Expect::Duplicate { .. } => kinds[2] += 1,
                Expect::Late { .. } => kinds[3] += 1,
            }
        }
        assert!(kinds.iter().all(|k| *k > 0), "{kinds:?}");
    }
}
