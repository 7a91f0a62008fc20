//! The stored format of state: RocksDB values and changelog records.
//!
//! Why a codec of its own: the rows are postcard encodings of the core's
//! types, and postcard numbers enum variants by position. Without a version
//! a renamed, reordered or added `StateRow` variant would silently change
//! what old bytes mean. So every value starts with [`FORMAT_VERSION`], a
//! value of any other version is refused with an error that names it, and
//! `tests/state_codec.rs` pins today's bytes (a golden test), so a change to
//! the encoding cannot go unnoticed.
//!
//! - key: `postcard(RowKey)` (the changelog's compaction key; RocksDB puts
//!   the partition in front, see `store`);
//! - value: `FORMAT_VERSION ++ postcard(StateRow)`; a delete has no value.
//!
//! The changelog record of partition `p` has exactly this key and value, so
//! a change is encoded once for both.

use tally_core::{Partition, RowKey, StateChange, StateRow};

/// The version byte every value starts with. Bump it, and teach
/// [`decode_row`] the old one, when the encoding of a row changes.
pub const FORMAT_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("state encoding: {0}")]
    Postcard(#[from] postcard::Error),
    #[error("a state value is empty: it has no format version")]
    Empty,
    #[error(
        "a state value has format version {found}, and this build reads only \
         version {FORMAT_VERSION}: it was written by another version of tally"
    )]
    UnknownVersion { found: u8 },
}

/// One state change, encoded: the partition, the key, and the value or
/// `None` for a delete.
pub type Encoded = (Partition, Vec<u8>, Option<Vec<u8>>);

pub fn encode_key(key: &RowKey) -> Result<Vec<u8>, CodecError> {
    Ok(postcard::to_allocvec(key)?)
}

pub fn encode_row(row: &StateRow) -> Result<Vec<u8>, CodecError> {
    Ok(postcard::to_extend(row, vec![FORMAT_VERSION])?)
}

/// Checks the version of a value without decoding the row (restore copies
/// changelog values into RocksDB as they are).
pub fn check_version(value: &[u8]) -> Result<(), CodecError> {
    match value.first() {
        None => Err(CodecError::Empty),
        Some(&FORMAT_VERSION) => Ok(()),
        Some(&found) => Err(CodecError::UnknownVersion { found }),
    }
}

pub fn decode_row(value: &[u8]) -> Result<StateRow, CodecError> {
    check_version(value)?;
    Ok(postcard::from_bytes(&value[1..])?)
}

pub fn encode(change: &StateChange) -> Result<Encoded, CodecError> {
    Ok(match change {
        StateChange::Put(p, row) => (*p, encode_key(&row.key())?, Some(encode_row(row)?)),
        StateChange::Delete(p, key) => (*p, encode_key(key)?, None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::{DedupRow, PartitionMeta};

    #[test]
    fn a_value_round_trips_and_starts_with_the_version() {
        let row = StateRow::Dedup(
            "o1".into(),
            DedupRow {
                event_ms: 5,
                offset: 9,
            },
        );
        let v = encode_row(&row).unwrap();
        assert_eq!(v[0], FORMAT_VERSION);
        assert_eq!(decode_row(&v).unwrap(), row);
    }

    #[test]
    fn an_unknown_version_is_refused_by_name() {
        let row = StateRow::Meta(PartitionMeta {
            next_offset: 1,
            max_event_ms: None,
            watermark: None,
        });
        let mut v = encode_row(&row).unwrap();
        v[0] = 7;
        let e = decode_row(&v).unwrap_err();
        assert!(e.to_string().contains("format version 7"), "{e}");
        assert!(matches!(decode_row(&[]), Err(CodecError::Empty)));
    }
}
