//! Several records of one session in one row of `chunks`: the body format.
//!
//! One SQLite row per record cost the writer, per record, an insert, an
//! entry in the `(session, seq)` index and seven bound parameters, which
//! rusqlite copies: about a third of the writer's CPU at full recording
//! (docs/benchmarks.md). The writer now stores one row per session per
//! batch. Nothing about the chain changes: every record is still hashed and
//! chained on its own, and keeps its hash. The row holds the hash of the
//! record before its first (`prev_hash`); the records after the first take
//! theirs from the record before them, which is what verification compares
//! anyway, so a removed or edited record still breaks the chain at that
//! record.
//!
//! A body is the records one after the other, each:
//!
//! | field | bytes |
//! | --- | --- |
//! | `ts` | 8, little-endian `i64` |
//! | `kind` | 4 (length, little-endian `u32`), then UTF-8 |
//! | `hash` | 4, then UTF-8 (64 hex digits as written) |
//! | `data` | 4, then UTF-8 (the canonical JSON that was hashed) |
//!
//! Texts are stored with their length rather than parsed: a damaged text
//! survives as it is, for verification to report.

use super::{Record, RecordKind, SessionId};

/// A run of consecutive records of one session, encoded for one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chunk {
    /// The session.
    pub(crate) session: SessionId,
    /// `seq` of its first record.
    pub(crate) first_seq: u64,
    /// Hash of the record before its first (64 zeros when it starts the chain).
    pub(crate) prev_hash: String,
    /// Time of its first record (Unix ns), for the outbox's oldest unshipped.
    pub(crate) ts: i64,
    /// How many records `body` holds.
    pub(crate) records: u32,
    /// How many of them are exchanges (the fleet outbox sums them).
    pub(crate) exchanges: u32,
    /// The encoded records.
    pub(crate) body: Vec<u8>,
}

impl Chunk {
    /// An empty chunk whose first record will be `first_seq`.
    pub(crate) fn new(session: SessionId, first_seq: u64, prev_hash: String) -> Chunk {
        Chunk { session, first_seq, prev_hash, ts: 0, records: 0, exchanges: 0, body: Vec::new() }
    }

    /// Appends the next record of the chain.
    pub(crate) fn push(&mut self, ts: i64, kind: &str, hash: &str, data: &str) {
        self.push_raw(ts, kind.as_bytes(), hash.as_bytes(), data.as_bytes());
    }

    /// [`Self::push`] for texts read back as they were stored (a migration
    /// keeps even invalid UTF-8, for verification to report).
    pub(crate) fn push_raw(&mut self, ts: i64, kind: &[u8], hash: &[u8], data: &[u8]) {
        if self.records == 0 {
            self.ts = ts;
        }
        self.body.reserve(8 + 12 + kind.len() + hash.len() + data.len());
        self.body.extend_from_slice(&ts.to_le_bytes());
        for text in [kind, hash, data] {
            // Texts are far below 4 GiB: records hold bodies of at most
            // max_body_bytes, and a batch commits at 16 MiB.
            self.body.extend_from_slice(&(text.len() as u32).to_le_bytes());
            self.body.extend_from_slice(text);
        }
        self.records += 1;
        if kind == RecordKind::Exchange.as_str().as_bytes() {
            self.exchanges += 1;
        }
    }
}

/// Why a stored body does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChunkError {
    /// It ends inside a record.
    #[error("it ends inside record {seq}")]
    Truncated {
        /// The record cut short.
        seq: u64,
    },
    /// A text is not UTF-8.
    #[error("record {seq}'s {field} is not UTF-8")]
    NotUtf8 {
        /// The record.
        seq: u64,
        /// Which text.
        field: &'static str,
    },
    /// It holds another number of records than its row says.
    #[error("it holds {found} records, its row says {expected}")]
    Count {
        /// What the row says.
        expected: u64,
        /// What the body holds (counted up to one past `expected`).
        found: u64,
    },
}

impl ChunkError {
    /// The first record it concerns.
    pub(crate) fn seq(&self, first_seq: u64) -> u64 {
        match self {
            ChunkError::Truncated { seq } | ChunkError::NotUtf8 { seq, .. } => *seq,
            ChunkError::Count { found, expected } => first_seq + (*found).min(*expected),
        }
    }
}

/// The records of one stored row, in chain order, each with the hash of the
/// record before it.
pub(crate) fn decode(
    session: &SessionId,
    first_seq: u64,
    prev_hash: String,
    expected: u64,
    body: &[u8],
) -> Result<Vec<Record>, ChunkError> {
    let mut out: Vec<Record> = Vec::with_capacity(usize::try_from(expected.min(4096)).unwrap_or(0));
    let mut rest = body;
    let mut prev = prev_hash;
    while !rest.is_empty() {
        let seq = first_seq + out.len() as u64;
        if out.len() as u64 == expected {
            return Err(ChunkError::Count { expected, found: expected + 1 });
        }
        let (ts, after) = rest.split_first_chunk::<8>().ok_or(ChunkError::Truncated { seq })?;
        rest = after;
        let mut text = |field: &'static str| -> Result<String, ChunkError> {
            let (len, after) = rest.split_first_chunk::<4>().ok_or(ChunkError::Truncated { seq })?;
            let len = usize::try_from(u32::from_le_bytes(*len)).map_err(|_| ChunkError::Truncated { seq })?;
            if after.len() < len {
                return Err(ChunkError::Truncated { seq });
            }
            let (bytes, after) = after.split_at(len);
            rest = after;
            String::from_utf8(bytes.to_vec()).map_err(|_| ChunkError::NotUtf8 { seq, field })
        };
        let kind = text("kind")?;
        let hash = text("hash")?;
        let data = text("data")?;
        let prev_hash = std::mem::replace(&mut prev, hash.clone());
        out.push(Record { session: session.clone(), seq, ts: i64::from_le_bytes(*ts), kind, data, prev_hash, hash });
    }
    if (out.len() as u64) != expected {
        return Err(ChunkError::Count { expected, found: out.len() as u64 });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::GENESIS_HASH;

    fn id() -> SessionId {
        SessionId::from_stored("0123456789ab-0123456789ab".into())
    }

    fn sample() -> Chunk {
        let mut c = Chunk::new(id(), 0, GENESIS_HASH.into());
        c.push(5, "start", &"a".repeat(64), "{\"k\":\"é\"}");
        c.push(-7, "exchange", &"b".repeat(64), "");
        c.push(i64::MAX, "end", &"c".repeat(64), "{}");
        c
    }

    #[test]
    fn round_trip_rebuilds_each_prev_hash() {
        let c = sample();
        assert_eq!((c.records, c.exchanges, c.ts), (3, 1, 5));
        let records = decode(&c.session, c.first_seq, c.prev_hash.clone(), 3, &c.body).unwrap();
        let got: Vec<_> = records.iter().map(|r| (r.seq, r.ts, r.kind.as_str(), r.data.as_str())).collect();
        assert_eq!(got, [(0, 5, "start", "{\"k\":\"é\"}"), (1, -7, "exchange", ""), (2, i64::MAX, "end", "{}")]);
        assert_eq!(records[0].prev_hash, GENESIS_HASH);
        assert_eq!(records[1].prev_hash, records[0].hash);
        assert_eq!(records[2].prev_hash, "b".repeat(64));
        assert_eq!(records[2].hash, "c".repeat(64));
    }

    #[test]
    fn a_later_chunk_numbers_from_its_first_seq() {
        let mut c = Chunk::new(id(), 41, "f".repeat(64));
        c.push(1, "event", &"d".repeat(64), "{}");
        let records = decode(&c.session, 41, c.prev_hash.clone(), 1, &c.body).unwrap();
        assert_eq!((records[0].seq, records[0].prev_hash.as_str()), (41, "f".repeat(64).as_str()));
    }

    #[test]
    fn every_truncation_is_an_error_naming_its_record() {
        let c = sample();
        // Where each record ends.
        let mut ends = Vec::new();
        let mut one = Chunk::new(id(), 0, GENESIS_HASH.into());
        for (ts, kind, hash, data) in
            [(5, "start", "a", "{\"k\":\"é\"}"), (-7, "exchange", "b", ""), (i64::MAX, "end", "c", "{}")]
        {
            one.push(ts, kind, &hash.repeat(64), data);
            ends.push(one.body.len());
        }
        assert_eq!(one.body, c.body);
        for cut in 1..c.body.len() {
            let err = decode(&c.session, 0, c.prev_hash.clone(), 3, &c.body[..cut]).unwrap_err();
            let whole = ends.iter().filter(|end| **end <= cut).count() as u64;
            if ends.contains(&cut) {
                assert_eq!(err, ChunkError::Count { expected: 3, found: whole }, "cut at {cut}");
            } else {
                assert_eq!(err, ChunkError::Truncated { seq: whole }, "cut at {cut}");
            }
            assert_eq!(err.seq(0), whole, "cut at {cut}");
        }
    }

    #[test]
    fn counts_and_text_must_match_the_row() {
        let c = sample();
        let more = decode(&c.session, 0, c.prev_hash.clone(), 2, &c.body).unwrap_err();
        assert_eq!(more, ChunkError::Count { expected: 2, found: 3 });
        assert_eq!(more.seq(0), 2);
        let fewer = decode(&c.session, 0, c.prev_hash.clone(), 4, &c.body).unwrap_err();
        assert_eq!(fewer, ChunkError::Count { expected: 4, found: 3 });
        assert!(decode(&c.session, 0, c.prev_hash.clone(), 0, &[]).unwrap().is_empty());
        let mut bad = c.body.clone();
        // The first record's kind: "start" -> "st\xffrt".
        bad[8 + 4 + 2] = 0xff;
        assert_eq!(
            decode(&c.session, 0, c.prev_hash.clone(), 3, &bad).unwrap_err(),
            ChunkError::NotUtf8 { seq: 0, field: "kind" }
        );
        // A length past the end.
        let mut long = c.body.clone();
        long[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&c.session, 0, c.prev_hash.clone(), 3, &long).unwrap_err(), ChunkError::Truncated { seq: 0 });
    }
}
