//! Parsing, validation and enrichment of one input order.
//!
//! The input is tolerant (numbers or numeric strings, RFC 3339 or epoch
//! timestamps, any-case currency) and the output is strict: an [`Order`] whose
//! fields are normalised, or a [`Rejection`] with a machine-readable
//! [`Reason`]. Money is carried as integer micro-units so sums are exact and
//! do not depend on the order in which events arrive.
//!
//! FX rates and the conversion to USD are in `fx`.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Region given to orders that name none.
pub const DEFAULT_REGION: &str = "unknown";

/// Micro-units per currency unit: amounts are stored as `amount * 10^6`.
pub const MICROS: i64 = 1_000_000;

/// Fixed-point scale of an FX rate: a rate is stored as `rate * 10^9`.
pub const RATE_SCALE: i64 = 1_000_000_000;

/// Why an input could not be used. `as_str` is the machine-readable reason
/// that goes into the DLQ header and the `reason` label of the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The bytes are not JSON (syntax error, bad UTF-8, truncated).
    NotJson,
    /// Valid JSON, but not an object (an array, a string, ...).
    NotObject,
    /// The same field appears twice, so which value counts is ambiguous.
    DuplicateField,
    /// A required field is absent, null or empty.
    MissingField,
    /// A field has a type that cannot be read as what it should be.
    WrongType,
    /// `amount` is zero or negative.
    NonPositiveAmount,
    /// `amount` is NaN or infinite.
    NonFiniteAmount,
    /// `amount` is positive but below one micro-unit or above the limit.
    AmountOutOfRange,
    /// `currency` is not three letters, or not in the FX table.
    UnknownCurrency,
    /// `created_at` is a string that is neither RFC 3339 nor an epoch number.
    InvalidTimestamp,
    /// `created_at` is outside the configured range (years 2000..2100 by default).
    TimestampOutOfRange,
    /// `created_at` is further ahead of the record's Kafka timestamp than
    /// the allowed clock skew.
    TimestampInFuture,
    /// The message is larger than the configured limit.
    Oversize,
}

impl Reason {
    /// Every reason, for metrics that pre-register one series per reason.
    pub const ALL: [Reason; 13] = [
        Reason::NotJson,
        Reason::NotObject,
        Reason::DuplicateField,
        Reason::MissingField,
        Reason::WrongType,
        Reason::NonPositiveAmount,
        Reason::NonFiniteAmount,
        Reason::AmountOutOfRange,
        Reason::UnknownCurrency,
        Reason::InvalidTimestamp,
        Reason::TimestampOutOfRange,
        Reason::TimestampInFuture,
        Reason::Oversize,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotJson => "not_json",
            Reason::NotObject => "not_object",
            Reason::DuplicateField => "duplicate_field",
            Reason::MissingField => "missing_field",
            Reason::WrongType => "wrong_type",
            Reason::NonPositiveAmount => "non_positive_amount",
            Reason::NonFiniteAmount => "non_finite_amount",
            Reason::AmountOutOfRange => "amount_out_of_range",
            Reason::UnknownCurrency => "unknown_currency",
            Reason::InvalidTimestamp => "invalid_timestamp",
            Reason::TimestampOutOfRange => "timestamp_out_of_range",
            Reason::TimestampInFuture => "timestamp_in_future",
            Reason::Oversize => "oversize",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected input: the reason, the field it concerns (if any) and a
/// human-readable detail. Rejections are data: they go to the DLQ.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub reason: Reason,
    pub field: Option<&'static str>,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: Reason, field: Option<&'static str>, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            field,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field {
            Some(field) => write!(f, "{} ({field}): {}", self.reason, self.detail),
            None => write!(f, "{}: {}", self.reason, self.detail),
        }
    }
}

/// An ISO-4217 code, upper case. `Copy`, so it costs nothing on the hot path.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

impl Currency {
    /// Accepts three ASCII letters in any case.
    pub fn parse(s: &str) -> Option<Currency> {
        let b = s.as_bytes();
        if b.len() != 3 || !b.iter().all(u8::is_ascii_alphabetic) {
            return None;
        }
        Some(Currency([
            b[0].to_ascii_uppercase(),
            b[1].to_ascii_uppercase(),
            b[2].to_ascii_uppercase(),
        ]))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII letters are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Currency::parse(&s).ok_or_else(|| serde::de::Error::custom("not a three-letter currency"))
    }
}

/// Bounds that make an input "absurd". All configurable.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Messages larger than this are rejected as `oversize` before parsing.
    pub max_message_bytes: usize,
    /// Earliest accepted event time (ms since the epoch, inclusive).
    pub min_event_ms: i64,
    /// Latest accepted event time (ms since the epoch, exclusive).
    pub max_event_ms: i64,
    /// Largest accepted amount, in micro-units of the original currency.
    pub max_amount_micros: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 * 1024,
            // 2000-01-01T00:00:00Z and 2100-01-01T00:00:00Z.
            min_event_ms: 946_684_800_000,
            max_event_ms: 4_102_444_800_000,
            max_amount_micros: 1_000_000_000 * MICROS,
        }
    }
}

/// A validated order. Ids are strings even when they arrived as integers, so
/// `42` and `"42"` are the same order and the same customer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub customer_id: String,
    /// Amount in micro-units of `currency`.
    pub amount_micros: i64,
    pub currency: Currency,
    /// Event time, ms since the epoch.
    pub created_at_ms: i64,
    pub region: String,
}

/// The known fields; everything else is ignored here and passed through by
/// the adapter that writes `enriched-orders`.
#[derive(Deserialize)]
struct RawOrder {
    #[serde(default)]
    order_id: Option<Value>,
    #[serde(default)]
    customer_id: Option<Value>,
    #[serde(default)]
    amount: Option<Value>,
    #[serde(default)]
    currency: Option<Value>,
    #[serde(default)]
    created_at: Option<Value>,
    #[serde(default)]
    region: Option<Value>,
}

/// Bytes to a validated [`Order`], or the reason it cannot be used.
pub fn parse_order(bytes: &[u8], limits: &Limits) -> Result<Order, Rejection> {
    if bytes.len() > limits.max_message_bytes {
        return Err(Rejection::new(
            Reason::Oversize,
            None,
            format!("{} bytes, limit {}", bytes.len(), limits.max_message_bytes),
        ));
    }
    // A derived struct also accepts a JSON array (as a tuple), so the shape
    // is checked first: only an object is an order.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                Ok(_) => Rejection::new(
                    Reason::NotObject,
                    None,
                    "the message is JSON but not an object",
                ),
                Err(e) => classify_json_error(e),
            },
        );
    }
    let raw: RawOrder = serde_json::from_slice(bytes).map_err(classify_json_error)?;
    order_of(raw, limits)
}

/// A top-level field of an order's message, as byte ranges of it: the key
/// (inside its quotes) and the value's JSON text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldSpan {
    pub key: (u32, u32),
    pub value: (u32, u32),
}

/// The fields [`parse_order`] reads; the enriched record passes the others
/// through.
const KNOWN_FIELDS: [&str; 6] = [
    "order_id",
    "customer_id",
    "amount",
    "currency",
    "created_at",
    "region",
];

/// [`parse_order`], also listing the message's top-level fields in
/// `fields`: sorted by key, and of a key given twice the last only (as a
/// JSON object reader keeps it). The adapter that writes the enriched
/// record copies the fields from these ranges instead of parsing the
/// message a second time (a profile of the job: that second parse was 4 %
/// of its CPU).
///
/// One pass reads every field as raw text and only the known fields' values
/// are parsed. The result is always [`parse_order`]'s: anything that pass
/// does not take exactly (a key with escapes, a known field given twice,
/// a value it cannot read, a rejection) goes through [`parse_order`]
/// itself, and `fields` is left empty.
pub fn parse_order_fields(
    bytes: &[u8],
    limits: &Limits,
    fields: &mut Vec<FieldSpan>,
) -> Result<Order, Rejection> {
    fields.clear();
    if bytes.len() <= limits.max_message_bytes {
        if let Some(order) = fast_fields(bytes, fields).and_then(|raw| order_of(raw, limits).ok()) {
            return Ok(order);
        }
    }
    fields.clear();
    parse_order(bytes, limits)
}

/// The one pass of [`parse_order_fields`]: `None` where it must not decide.
fn fast_fields(bytes: &[u8], fields: &mut Vec<FieldSpan>) -> Option<RawOrder> {
    use serde::de::{DeserializeSeed, MapAccess, Visitor};
    use serde_json::value::RawValue;

    struct Seed<'o> {
        base: usize,
        out: &'o mut Vec<FieldSpan>,
    }
    impl<'de> DeserializeSeed<'de> for Seed<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Seed<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
            let at = |p: *const u8, len: usize| {
                let start = (p as usize).wrapping_sub(self.base) as u32;
                (start, start + len as u32)
            };
            // A key with escapes cannot be borrowed: an error, so the
            // general path decides.
            while let Some(k) = m.next_key::<&'de str>()? {
                let v: &'de RawValue = m.next_value()?;
                self.out.push(FieldSpan {
                    key: at(k.as_ptr(), k.len()),
                    value: at(v.get().as_ptr(), v.get().len()),
                });
            }
            Ok(())
        }
    }

    if bytes.len() > u32::MAX as usize {
        return None;
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    Seed {
        base: bytes.as_ptr() as usize,
        out: fields,
    }
    .deserialize(&mut de)
    .ok()?;
    de.end().ok()?;
    let text = |r: (u32, u32)| bytes.get(r.0 as usize..r.1 as usize);
    let mut known: [Option<&[u8]>; 6] = [None; 6];
    for f in fields.iter() {
        let key = text(f.key)?;
        if let Some(i) = KNOWN_FIELDS.iter().position(|k| k.as_bytes() == key) {
            if known[i].is_some() {
                // A duplicate known field: its rejection is parse_order's.
                return None;
            }
            known[i] = Some(text(f.value)?);
        }
    }
    let value = |i: usize| -> Option<Option<Value>> {
        match known[i] {
            None => Some(None),
            // `null` reads as absent, as for the derived `Option` fields.
            Some(v) => serde_json::from_slice::<Option<Value>>(v).ok(),
        }
    };
    let raw = RawOrder {
        order_id: value(0)?,
        customer_id: value(1)?,
        amount: value(2)?,
        currency: value(3)?,
        created_at: value(4)?,
        region: value(5)?,
    };
    // Sorted by key (a stable sort: equal keys keep their order), then of
    // equal keys the last, as a map keeps it. One linear pass, not a
    // removal each: a 64 KiB message of one key repeated would otherwise
    // cost n² moves.
    let key = |f: &FieldSpan| &bytes[f.key.0 as usize..f.key.1 as usize];
    fields.sort_by(|a, b| key(a).cmp(key(b)));
    let mut kept = 0;
    for i in 0..fields.len() {
        let superseded = fields
            .get(i + 1)
            .is_some_and(|next| key(next) == key(&fields[i]));
        if !superseded {
            fields[kept] = fields[i];
            kept += 1;
        }
    }
    fields.truncate(kept);
    Some(raw)
}

/// A parsed [`RawOrder`] to a validated [`Order`].
fn order_of(raw: RawOrder, limits: &Limits) -> Result<Order, Rejection> {
    let order_id = id_field(raw.order_id, "order_id")?;
    let customer_id = id_field(raw.customer_id, "customer_id")?;
    let amount_micros = amount_field(raw.amount, limits)?;
    let currency = currency_field(raw.currency)?;
    let created_at_ms = time_field(raw.created_at, limits)?;
    let region = match raw.region {
        None => DEFAULT_REGION.to_string(),
        Some(Value::String(s)) if s.is_empty() => DEFAULT_REGION.to_string(),
        Some(Value::String(s)) => s,
        Some(other) => return Err(wrong_type("region", "a string", &other)),
    };
    Ok(Order {
        order_id,
        customer_id,
        amount_micros,
        currency,
        created_at_ms,
        region,
    })
}

fn classify_json_error(e: serde_json::Error) -> Rejection {
    use serde_json::error::Category;
    let msg = e.to_string();
    match e.classify() {
        Category::Data if msg.starts_with("duplicate field") => {
            Rejection::new(Reason::DuplicateField, None, msg)
        }
        Category::Data => Rejection::new(Reason::NotObject, None, msg),
        Category::Syntax | Category::Eof | Category::Io => {
            Rejection::new(Reason::NotJson, None, msg)
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(field: &'static str, expected: &str, got: &Value) -> Rejection {
    Rejection::new(
        Reason::WrongType,
        Some(field),
        format!("expected {expected}, got {}", kind_of(got)),
    )
}

fn missing(field: &'static str) -> Rejection {
    Rejection::new(Reason::MissingField, Some(field), "required")
}

fn id_field(v: Option<Value>, field: &'static str) -> Result<String, Rejection> {
    match v {
        None => Err(missing(field)),
        Some(Value::String(s)) if s.is_empty() => Err(missing(field)),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        Some(other) => Err(wrong_type(field, "a string or an integer", &other)),
    }
}

fn amount_field(v: Option<Value>, limits: &Limits) -> Result<i64, Rejection> {
    const F: &str = "amount";
    let x = match v {
        None => return Err(missing(F)),
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(Value::String(s)) => s.trim().parse::<f64>().map_err(|_| {
            Rejection::new(Reason::WrongType, Some(F), format!("{s:?} is not a number"))
        })?,
        Some(other) => return Err(wrong_type(F, "a number or a numeric string", &other)),
    };
    amount_to_micros(x, limits.max_amount_micros)
}

/// A positive, finite amount to micro-units, rounding to the nearest micro.
/// Below 10^9 units an f64 holds every micro exactly, so this is exact for
/// any amount written with at most six decimals.
pub fn amount_to_micros(x: f64, max_micros: i64) -> Result<i64, Rejection> {
    const F: Option<&str> = Some("amount");
    if !x.is_finite() {
        return Err(Rejection::new(Reason::NonFiniteAmount, F, format!("{x}")));
    }
    if x <= 0.0 {
        return Err(Rejection::new(Reason::NonPositiveAmount, F, format!("{x}")));
    }
    let micros = (x * MICROS as f64).round();
    if micros < 1.0 || micros > max_micros as f64 {
        return Err(Rejection::new(
            Reason::AmountOutOfRange,
            F,
            format!("{x} is outside (0.000001, {}]", max_micros / MICROS),
        ));
    }
    Ok(micros as i64)
}

fn currency_field(v: Option<Value>) -> Result<Currency, Rejection> {
    const F: &str = "currency";
    match v {
        None => Err(missing(F)),
        Some(Value::String(s)) if s.is_empty() => Err(missing(F)),
        Some(Value::String(s)) => Currency::parse(&s).ok_or_else(|| {
            Rejection::new(
                Reason::UnknownCurrency,
                Some(F),
                format!("{s:?} is not a three-letter ISO-4217 code"),
            )
        }),
        Some(other) => Err(wrong_type(F, "a string", &other)),
    }
}

fn time_field(v: Option<Value>, limits: &Limits) -> Result<i64, Rejection> {
    const F: &str = "created_at";
    let ms = match v {
        None => return Err(missing(F)),
        Some(Value::String(s)) if s.is_empty() => return Err(missing(F)),
        Some(Value::Number(n)) => epoch_to_ms(n.as_f64().unwrap_or(f64::NAN)),
        Some(Value::String(s)) => parse_time_str(&s).ok_or_else(|| {
            Rejection::new(
                Reason::InvalidTimestamp,
                Some(F),
                format!("{s:?} is neither RFC 3339 nor epoch seconds/milliseconds"),
            )
        })?,
        Some(other) => return Err(wrong_type(F, "a string or a number", &other)),
    };
    match ms {
        Some(ms) if ms >= limits.min_event_ms && ms < limits.max_event_ms => Ok(ms),
        _ => Err(Rejection::new(
            Reason::TimestampOutOfRange,
            Some(F),
            format!(
                "outside [{}, {}) ms since the epoch",
                limits.min_event_ms, limits.max_event_ms
            ),
        )),
    }
}

/// Epoch numbers below 10^11 are seconds (10^11 s is the year 5138), the rest
/// milliseconds (10^11 ms is 1973). Both sides of the cut are far outside the
/// default range, so no real timestamp is ambiguous. `None` when not finite.
fn epoch_to_ms(x: f64) -> Option<i64> {
    if !x.is_finite() {
        return None;
    }
    let ms = if x.abs() < 1e11 { x * 1000.0 } else { x };
    if ms.abs() > 9.0e15 {
        return None;
    }
    Some(ms.round() as i64)
}

/// An RFC 3339 time or an epoch number (seconds or milliseconds, as for
/// `created_at`), in ms since the epoch.
pub fn parse_time(s: &str) -> Option<i64> {
    parse_time_str(s).flatten()
}

fn parse_time_str(s: &str) -> Option<Option<i64>> {
    let t = s.trim();
    if let Ok(dt) = chrono::DateTime::parse_from_rfc3339(t) {
        return Some(Some(dt.timestamp_millis()));
    }
    let numeric = !t.is_empty()
        && t.bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
        && t.bytes().any(|b| b.is_ascii_digit());
    if numeric {
        if let Ok(x) = t.parse::<f64>() {
            return Some(epoch_to_ms(x));
        }
    }
    None
}

/// A valid order with its USD value and the time it was processed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrichedOrder {
    #[serde(flatten)]
    pub order: Order,
    pub amount_usd_micros: i64,
    pub rate: Rate,
    /// Wall-clock time the pod handled it, ms since the epoch (given to the core).
    pub processed_at_ms: i64,
}

/// Adds `amount_usd`; an unknown currency is a rejection.
pub fn enrich(
    order: Order,
    fx: &FxTable,
    processed_at_ms: i64,
) -> Result<EnrichedOrder, Rejection> {
    let rate = fx
        .rate_at(order.currency, order.created_at_ms)
        .ok_or_else(|| {
            Rejection::new(
                Reason::UnknownCurrency,
                Some("currency"),
                format!(
                    "{} has no FX rate in force at the order's created_at",
                    order.currency
                ),
            )
        })?;
    let amount_usd_micros = usd_micros(order.amount_micros, rate).ok_or_else(|| {
        Rejection::new(
            Reason::AmountOutOfRange,
            Some("amount"),
            format!(
                "{} {} at {} is worth more than {} USD",
                order.amount_micros as f64 / MICROS as f64,
                order.currency,
                rate.as_f64(),
                MAX_ORDER_USD_MICROS / MICROS
            ),
        )
    })?;
    Ok(EnrichedOrder {
        amount_usd_micros,
        rate,
        processed_at_ms,
        order,
    })
}

/// Parse, validate and enrich in one step.
pub fn validate(
    bytes: &[u8],
    limits: &Limits,
    fx: &FxTable,
    processed_at_ms: i64,
) -> Result<EnrichedOrder, Rejection> {
    enrich(parse_order(bytes, limits)?, fx, processed_at_ms)
}

mod fx;
pub use fx::*;

#[cfg(test)]
mod tests;
