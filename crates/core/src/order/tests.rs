use super::*;

fn parse(s: &str) -> Result<Order, Rejection> {
    parse_order(s.as_bytes(), &Limits::default())
}

fn reason(s: &str) -> Reason {
    parse(s).unwrap_err().reason
}

const OK: &str = r#"{"order_id":"o1","customer_id":"c1","amount":12.34,"currency":"eur","created_at":"2024-05-01T12:00:00Z"}"#;

/// What a JSON object reader makes of the message's fields (sorted,
/// the last of a key given twice), as text: what
/// [`parse_order_fields`] must list when it lists anything.
fn fields_by_map(bytes: &[u8]) -> Vec<(String, String)> {
    use serde_json::value::RawValue;
    serde_json::from_slice::<std::collections::BTreeMap<&str, &RawValue>>(bytes)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.to_string(), v.get().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn check_fields(s: &str) {
    let limits = Limits::default();
    let mut fields = vec![FieldSpan {
        key: (0, 0),
        value: (0, 0),
    }];
    let got = parse_order_fields(s.as_bytes(), &limits, &mut fields);
    assert_eq!(got, parse_order(s.as_bytes(), &limits), "{s}");
    if fields.is_empty() {
        return;
    }
    assert!(got.is_ok(), "fields listed for a rejected message: {s}");
    let text = |r: (u32, u32)| s[r.0 as usize..r.1 as usize].to_string();
    let listed: Vec<(String, String)> = fields
        .iter()
        .map(|f| (text(f.key), text(f.value)))
        .collect();
    assert_eq!(listed, fields_by_map(s.as_bytes()), "{s}");
}

#[test]
fn the_one_pass_parse_agrees_with_parse_order() {
    for s in [
        OK,
        r#"{"order_id":7,"customer_id":"c1","amount":"12.5","currency":"USD","created_at":1714564800,"region":"eu","note":{"a":[1,2,{"b":"}"}]}}"#,
        r#" {"z":1,"order_id":"o","customer_id":"c","amount":1,"currency":"USD","created_at":1714564800000,"a":"x","z":2} "#,
        r#"{"order_id":"o","order_id":"p","customer_id":"c","amount":1,"currency":"USD","created_at":1714564800}"#,
        r#"{"order\u005fid":"o","customer_id":"c","amount":1,"currency":"USD","created_at":1714564800}"#,
        r#"{"order_id":"o","customer_id":"c","amount":1,"currency":"USD","created_at":1714564800,"n\"x":1}"#,
        r#"{"order_id":"o","customer_id":"c","amount":1,"currency":"USD","created_at":1714564800,"region":null}"#,
        r#"{"order_id":"o","customer_id":"c","amount":null,"currency":"USD","created_at":1714564800}"#,
        r#"{"order_id":"o","customer_id":"c","amount":1e400,"currency":"USD","created_at":1714564800}"#,
        r#"{"order_id":"o","customer_id":"c","amount":-1,"currency":"USD","created_at":1714564800}"#,
        r#"{"order_id":"o","customer_id":"c","amount":1,"currency":"XX","created_at":1714564800}"#,
        r#"{"order_id":"o","customer_id":"c","amount":1,"currency":"USD","created_at":1714564800"#,
        r#"{"order_id":"o","customer_id":"c","amount":1,"currency":"USD","created_at":1714564800} x"#,
        r#"[1,2]"#,
        r#"{}"#,
        r#"{"order_id":"ö","customer_id":"ü","amount":1,"currency":"USD","created_at":1714564800,"é":"ß"}"#,
    ] {
        check_fields(s);
    }
}

proptest::proptest! {
    /// Messages built from known and unknown fields in any order, some
    /// twice, some null, some with escaped keys or odd values.
    #[test]
    fn the_one_pass_parse_agrees_on_any_object(
        parts in proptest::collection::vec((0usize..10, 0usize..8), 0..8),
        at in 0usize..8,
    ) {
        let keys = ["order_id", "customer_id", "amount", "currency", "created_at", "region", "note", "amount_usd", "x\\u0041", "source"];
        let values = ["\"o1\"", "42", "12.5", "\"usd\"", "1714564800", "null", "{\"a\":[1,{\"b\":\"}\"}]}", "\"2024-05-01T12:00:00Z\""];
        // A valid order somewhere among them, so most cases list fields.
        let valid = r#""order_id":"o","customer_id":7,"amount":3.5,"currency":"EUR","created_at":1714564800"#;
        let mut body: Vec<String> = parts.iter().map(|(k, v)| format!("\"{}\":{}", keys[*k], values[*v])).collect();
        body.insert(at.min(body.len()), valid.to_string());
        check_fields(&format!("{{{}}}", body.join(",")));
    }
}

#[test]
fn accepts_a_plain_order_and_normalises_it() {
    let o = parse(OK).unwrap();
    assert_eq!(o.order_id, "o1");
    assert_eq!(o.amount_micros, 12_340_000);
    assert_eq!(o.currency.as_str(), "EUR");
    assert_eq!(o.created_at_ms, 1_714_564_800_000);
    assert_eq!(o.region, DEFAULT_REGION);
}

#[test]
fn is_tolerant_in_what_it_accepts() {
    let o = parse(r#"{"order_id":7,"customer_id":99,"amount":"0.10","currency":"Usd","created_at":1714564800,"region":"eu-west","extra":[1,2]}"#).unwrap();
    assert_eq!((o.order_id.as_str(), o.customer_id.as_str()), ("7", "99"));
    assert_eq!(o.amount_micros, 100_000);
    assert_eq!(o.created_at_ms, 1_714_564_800_000);
    assert_eq!(o.region, "eu-west");
    let ms = parse(r#"{"order_id":"a","customer_id":"b","amount":1,"currency":"USD","created_at":1714564800123}"#).unwrap();
    assert_eq!(ms.created_at_ms, 1_714_564_800_123);
    let s = parse(r#"{"order_id":"a","customer_id":"b","amount":1,"currency":"USD","created_at":"1714564800.5"}"#).unwrap();
    assert_eq!(s.created_at_ms, 1_714_564_800_500);
    let tz = parse(r#"{"order_id":"a","customer_id":"b","amount":1,"currency":"USD","created_at":"2024-05-01T14:00:00+02:00"}"#).unwrap();
    assert_eq!(tz.created_at_ms, 1_714_564_800_000);
}

#[test]
fn every_failure_has_a_reason() {
    assert_eq!(reason("not json"), Reason::NotJson);
    assert_eq!(reason(r#"{"order_id": "#), Reason::NotJson);
    assert_eq!(reason("[1,2]"), Reason::NotObject);
    assert_eq!(
        reason(r#"{"order_id":"a","order_id":"b"}"#),
        Reason::DuplicateField
    );
    assert_eq!(
        reason(r#"{"customer_id":"b","amount":1,"currency":"USD","created_at":1714564800}"#),
        Reason::MissingField
    );
    assert_eq!(
        reason(
            r#"{"order_id":null,"customer_id":"b","amount":1,"currency":"USD","created_at":1714564800}"#
        ),
        Reason::MissingField
    );
    assert_eq!(
        reason(
            r#"{"order_id":1.5,"customer_id":"b","amount":1,"currency":"USD","created_at":1714564800}"#
        ),
        Reason::WrongType
    );
    assert_eq!(
        reason(
            r#"{"order_id":"a","customer_id":"b","amount":"ten","currency":"USD","created_at":1714564800}"#
        ),
        Reason::WrongType
    );
    assert_eq!(
        reason(
            r#"{"order_id":"a","customer_id":"b","amount":true,"currency":"USD","created_at":1714564800}"#
        ),
        Reason::WrongType
    );
    assert_eq!(
        reason(
            r#"{"order_id":"a","customer_id":"b","amount":0,"currency":"USD","created_at":1714564800}"#
        ),
        Reason::NonPositiveAmount
    );
    assert_eq!(
        reason(
            r#"{"order_id":"a","customer_id":"b","amount":-3,"currency":"USD","created_at":1714564800}"#
        ),
        Reason::NonPositiveAmount
    );
    assert_eq!(
        reason(
            r#"{"order_id":"a","customer_id":"b","amount":"NaN","currency":"USD","created_at":1714564800}"#
        ),
        Reason::NonFiniteAmount
    );
    assert_eq!(
        reason(
            r#"{"order_id":"a","customer_id":"b","amount":"inf","currency":"USD","created_at":1714564800}"#
        ),
        Reason::NonFiniteAmount
    );
    assert_eq!(
        reason(
            r#"{"order_id":"a","customer_id":"b","amount":1e-9,"currency":"USD","created_at":1714564800}"#
        ),
        Reason::AmountOutOfRange
    );
    assert_eq!(
        reason(
            r#"{"order_id":"a","customer_id":"b","amount":1e12,"currency":"USD","created_at":1714564800}"#
        ),
        Reason::AmountOutOfRange
    );
    assert_eq!(
        reason(
            r#"{"order_id":"a","customer_id":"b","amount":1,"currency":"dollars","created_at":1714564800}"#
        ),
        Reason::UnknownCurrency
    );
    assert_eq!(
        reason(
            r#"{"order_id":"a","customer_id":"b","amount":1,"currency":"USD","created_at":"yesterday"}"#
        ),
        Reason::InvalidTimestamp
    );
    assert_eq!(
        reason(
            r#"{"order_id":"a","customer_id":"b","amount":1,"currency":"USD","created_at":"1999-12-31T23:59:59Z"}"#
        ),
        Reason::TimestampOutOfRange
    );
    assert_eq!(
        reason(
            r#"{"order_id":"a","customer_id":"b","amount":1,"currency":"USD","created_at":4102444800}"#
        ),
        Reason::TimestampOutOfRange
    );
    assert_eq!(
        reason(
            r#"{"order_id":"a","customer_id":"b","amount":1,"currency":"USD","created_at":1714564800,"region":5}"#
        ),
        Reason::WrongType
    );
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(70_000));
    assert_eq!(reason(&big), Reason::Oversize);
}

#[test]
fn rejection_names_the_field() {
    let r = parse(r#"{"order_id":"a","customer_id":"b","amount":1,"currency":"USD"}"#).unwrap_err();
    assert_eq!(r.field, Some("created_at"));
    assert_eq!(r.to_string(), "missing_field (created_at): required");
}

#[test]
fn enrichment_converts_exactly_and_rejects_unknown_currency() {
    let fx = FxTable::with_defaults();
    let e = validate(OK.as_bytes(), &Limits::default(), &fx, 5).unwrap();
    // 12.34 EUR × 1.08 = 13.3272 USD
    assert_eq!(e.amount_usd_micros, 13_327_200);
    assert_eq!(e.processed_at_ms, 5);
    let xxx = OK.replace("eur", "XXX");
    let r = validate(xxx.as_bytes(), &Limits::default(), &fx, 5).unwrap_err();
    assert_eq!(r.reason, Reason::UnknownCurrency);
}

#[test]
fn usd_rounding_is_half_up_to_the_micro() {
    let r = Rate::from_f64(0.0067).unwrap();
    assert_eq!(usd_micros(1, r), Some(0));
    assert_eq!(usd_micros(75, r), Some(1)); // 0.5025 -> 1
    assert_eq!(usd_micros(1_000 * MICROS, r), Some(6_700_000));
}
