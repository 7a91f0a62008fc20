//! Golden bytes of the state codec: one row of every `StateRow` variant,
//! encoded as RocksDB stores it and the changelog carries it, pinned in
//! `tests/golden/state_codec.hex`.
//!
//! Why: the rows are postcard encodings of the core's types, which number
//! enum variants by position and fields by order. A renamed, reordered or
//! added variant or field would change what stored bytes mean without any
//! compiler error; this test fails instead. A deliberate format change bumps
//! `state::codec::FORMAT_VERSION` and re-pins the file (`TALLY_BLESS=1 cargo
//! test --test state_codec`), and the old version stays readable or is
//! refused by name.
//!
//! Checked that it can fail: swapping the two fields of `DedupRow` made
//! `todays_encoding_is_pinned` fail.

use std::path::Path;

use tally::state::codec::{decode_row, encode_key, encode_row, FORMAT_VERSION};
use tally_core::{
    customer_hash, Aggregate, Currency, DedupRow, DedupSegment, PartitionMeta, RowKey, Session,
    SessionSet, StateRow, WindowKey, WindowRow,
};

fn agg() -> Aggregate {
    let mut a = Aggregate::default();
    a.add(
        12_340_000,
        Currency::parse("EUR").unwrap(),
        11_000_000,
        customer_hash("c1"),
    );
    a
}

fn rows() -> Vec<(&'static str, StateRow)> {
    let key = WindowKey {
        spec: 2,
        group: "EUR".into(),
        start: 1_714_564_800_000,
    };
    vec![
        (
            "window",
            StateRow::Window(
                key.clone(),
                WindowRow {
                    end: 1_714_564_860_000,
                    agg: agg(),
                    offset: 41,
                    closed: true,
                },
            ),
        ),
        (
            "sessions",
            StateRow::Sessions(
                4,
                "c1".into(),
                SessionSet {
                    sessions: vec![Session {
                        start: 10,
                        last: 20,
                        agg: agg(),
                        offset: 7,
                        closed: false,
                    }],
                    retracted: vec![5],
                    offset: 7,
                },
            ),
        ),
        (
            "dedup",
            StateRow::Dedup(
                "o-1".into(),
                DedupRow {
                    event_ms: 99,
                    offset: 3,
                },
            ),
        ),
        (
            "meta",
            StateRow::Meta(PartitionMeta {
                next_offset: 100,
                max_event_ms: Some(5_000),
                watermark: None,
            }),
        ),
        (
            "members",
            StateRow::Members(key.clone(), 3, vec![1, u64::MAX]),
        ),
        ("expiry", StateRow::Expiry(key, 1_714_651_260_000)),
        (
            "dedup_segment",
            StateRow::DedupSegment(
                100,
                2,
                DedupSegment {
                    expire_ms: 3_700_099,
                    entries: vec![(
                        "o-1".into(),
                        DedupRow {
                            event_ms: 99,
                            offset: 3,
                        },
                    )],
                },
            ),
        ),
    ]
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `name key-hex value-hex`, one line per row.
fn encoded() -> String {
    let mut out = String::new();
    for (name, row) in rows() {
        let k = encode_key(&row.key()).unwrap();
        let v = encode_row(&row).unwrap();
        out.push_str(&format!("{name} {} {}\n", hex(&k), hex(&v)));
    }
    out
}

#[test]
fn todays_encoding_is_pinned() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/state_codec.hex");
    let now = encoded();
    if std::env::var("TALLY_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&file, &now).unwrap();
    }
    let pinned = std::fs::read_to_string(&file).expect("tests/golden/state_codec.hex");
    assert_eq!(
        now, pinned,
        "the state encoding changed: bump FORMAT_VERSION and re-pin (see the module doc)"
    );
}

#[test]
fn every_pinned_row_decodes_to_itself() {
    for (name, row) in rows() {
        let v = encode_row(&row).unwrap();
        assert_eq!(v[0], FORMAT_VERSION, "{name}");
        assert_eq!(decode_row(&v).unwrap(), row, "{name}");
    }
    // Every variant has a row here. The match has no wildcard, so a new
    // variant does not compile until it is added (and pinned) above.
    let mut seen = [false; 7];
    for (_, row) in rows() {
        let i = match row.key() {
            RowKey::Window(_) => 0,
            RowKey::Sessions(..) => 1,
            RowKey::Dedup(_) => 2,
            RowKey::Meta => 3,
            RowKey::Members(..) => 4,
            RowKey::Expiry(_) => 5,
            RowKey::DedupSegment(..) => 6,
        };
        seen[i] = true;
    }
    assert_eq!(seen, [true; 7]);
}
