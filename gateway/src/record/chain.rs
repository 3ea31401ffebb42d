//! The per-session hash chain: how a record's hash is computed, the
//! canonical JSON it covers, and the check that a stored session is intact.
//!
//! `hash = SHA-256(DOMAIN || lp(session) || lp(prev_hash) || lp(seq) ||
//! lp(ts) || lp(kind) || lp(data))` where `lp(x)` is `x`'s length as 8 bytes
//! big-endian followed by `x`, integers are written in decimal and
//! `prev_hash` is the previous record's lower-case hex hash ([`GENESIS_HASH`]
//! for seq 0). Length prefixes make the encoding unambiguous; the session id
//! ties every record to its session, so records cannot be moved between
//! sessions. `docs/recording.md` shows the same in a few lines of Python for
//! auditors checking an export offline.

use super::{
    model::{RecordKind, SessionEnd, SessionMeta},
    store::SessionRow,
    Record,
};

/// `prev_hash` of every session's first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Domain separation: these hashes mean nothing anywhere else.
const DOMAIN: &[u8] = b"ci-gateway session record v1\0";

/// The hash of a record (lower-case hex SHA-256).
pub fn hash_record(session: &str, prev_hash: &str, seq: u64, ts: i64, kind: &str, data: &str) -> String {
    use std::io::Write as _;
    // The writer hashes every record: decimal and hex go through stack
    // buffers rather than temporary strings.
    let mut seq_buf = [0u8; 20];
    let mut ts_buf = [0u8; 20];
    let decimal = |buf: &mut [u8; 20], n: &dyn std::fmt::Display| -> usize {
        let mut cursor = std::io::Cursor::new(&mut buf[..]);
        // At most 20 characters (u64::MAX, i64::MIN): always fits.
        let _ = write!(cursor, "{n}");
        cursor.position() as usize
    };
    let seq_len = decimal(&mut seq_buf, &seq);
    let ts_len = decimal(&mut ts_buf, &ts);
    // ring's SHA-256 (BoringSSL's assembly) rather than `sha2`: the same
    // digest, and on CPUs without SHA-NI (many CI hosts' Xeons, and every
    // CPU under valgrind) its AVX2 code takes about 40% fewer instructions
    // than `sha2`'s portable one for a typical 830-byte record.
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    h.update(DOMAIN);
    for field in [
        session.as_bytes(),
        prev_hash.as_bytes(),
        &seq_buf[..seq_len],
        &ts_buf[..ts_len],
        kind.as_bytes(),
        data.as_bytes(),
    ] {
        h.update(&(field.len() as u64).to_be_bytes());
        h.update(field);
    }
    let mut out = [0u8; 64];
    // 32 bytes always fill 64 hex digits, which are ASCII.
    let _ = hex::encode_to_slice(h.finish(), &mut out);
    // One copy, not a char-by-char build (the writer hashes every record).
    std::str::from_utf8(&out).map(str::to_owned).unwrap_or_default()
}

/// `value` as canonical JSON: no whitespace, object keys sorted by code
/// point, strings and numbers as serde_json writes them. Canonical so the
/// same content always hashes the same, whatever order fields were built in.
/// The reference definition: the writer produces the same bytes without a
/// `Value` (`encode`), and tests hold it to this.
#[cfg(test)]
pub(crate) fn canonical_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

#[cfg(test)]
fn write_canonical(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The outcome of verifying one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every check passed.
    Intact {
        /// Records in the chain.
        records: u64,
    },
    /// The first problem found.
    Broken {
        /// The record at fault; `None` when the sessions row disagrees with
        /// an intact chain.
        seq: Option<u64>,
        /// What is wrong, in words.
        problem: String,
    },
}

impl Verdict {
    /// True for [`Verdict::Intact`].
    pub fn is_intact(&self) -> bool {
        matches!(self, Verdict::Intact { .. })
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Intact { records } => write!(f, "intact ({records} records)"),
            Verdict::Broken { seq: Some(seq), problem } => write!(f, "BROKEN at record {seq}: {problem}"),
            Verdict::Broken { seq: None, problem } => write!(f, "BROKEN: sessions row: {problem}"),
        }
    }
}

fn broken(seq: Option<u64>, problem: impl Into<String>) -> Verdict {
    Verdict::Broken { seq, problem: problem.into() }
}

/// Checks a session's records (ordered by seq, as stored) against each other
/// and against its sessions row: every hash, seq continuity (a removed
/// record), the row's copy of the start metadata, its last seq and hash (a
/// removed tail), its exchange count and its end.
pub(crate) fn verify(row: &SessionRow, records: &[Record]) -> Verdict {
    let Some(first) = records.first() else {
        return broken(Some(0), "the start record is missing");
    };
    let mut prev = GENESIS_HASH;
    let mut exchanges = 0u64;
    for (i, r) in records.iter().enumerate() {
        let expected = i as u64;
        if r.seq != expected {
            return broken(
                Some(expected),
                format!("record {expected} is missing (the next stored record is {})", r.seq),
            );
        }
        if r.prev_hash != prev {
            return broken(Some(r.seq), "its prev_hash is not the hash of the record before it");
        }
        if hash_record(row.id.as_str(), &r.prev_hash, r.seq, r.ts, &r.kind, &r.data) != r.hash {
            return broken(Some(r.seq), "hash mismatch: its time, kind or data was changed");
        }
        let last = i + 1 == records.len();
        match r.record_kind() {
            Some(RecordKind::Start) if r.seq == 0 => {}
            _ if r.seq == 0 => return broken(Some(0), format!("the first record is `{}`, not `start`", r.kind)),
            Some(RecordKind::Exchange) => exchanges += 1,
            Some(RecordKind::Event) => {}
            Some(RecordKind::End) if last => {}
            Some(RecordKind::End) => return broken(Some(r.seq), "an `end` record that is not the last record"),
            Some(RecordKind::Start) | None => return broken(Some(r.seq), format!("unknown record kind `{}`", r.kind)),
        }
        prev = &r.hash;
    }
    if let Some(problem) = row_mirrors_start(row, &first.data) {
        return broken(None, problem);
    }
    let Some(last) = records.last() else { return broken(Some(0), "the start record is missing") };
    if row.last_seq > last.seq {
        return broken(
            Some(last.seq + 1),
            format!("records {}..={} are missing (the tail was removed)", last.seq + 1, row.last_seq),
        );
    }
    if row.last_seq < last.seq {
        return broken(None, format!("says the chain ends at record {} but record {} exists", row.last_seq, last.seq));
    }
    if row.last_hash != last.hash {
        return broken(Some(last.seq), "the sessions row holds a different hash for this last record");
    }
    if row.last_ts != last.ts {
        return broken(None, "its last activity time differs from the last record's");
    }
    if row.exchanges != exchanges {
        return broken(None, format!("counts {} exchanges, the chain holds {exchanges}", row.exchanges));
    }
    if last.record_kind() == Some(RecordKind::End) {
        let Ok(end) = serde_json::from_str::<SessionEnd>(&last.data) else {
            return broken(Some(last.seq), "the end record's data does not decode");
        };
        let claims = (row.ended, row.bytes_up, row.bytes_down, row.outcome.as_deref());
        if claims != (Some(last.ts), Some(end.bytes_up), Some(end.bytes_down), Some(end.outcome.as_str())) {
            return broken(None, "its end (time, bytes or outcome) differs from the end record");
        }
    } else if row.ended.is_some() || row.bytes_up.is_some() || row.bytes_down.is_some() || row.outcome.is_some() {
        return broken(None, "records an end but the chain has no end record");
    }
    Verdict::Intact { records: records.len() as u64 }
}

/// What differs between the sessions row and the start record's data.
fn row_mirrors_start(row: &SessionRow, data: &str) -> Option<String> {
    if row.meta != data {
        return Some("its metadata differs from the start record".into());
    }
    let meta: SessionMeta = match serde_json::from_str(data) {
        Ok(meta) => meta,
        Err(e) => return Some(format!("the start record's data does not decode: {e}")),
    };
    let mismatches = [
        ("session id", meta.session != row.id),
        ("conn_id", meta.conn_id != row.conn_id),
        ("start time", meta.started != row.started),
        ("identity", meta.identity != row.identity),
        ("host", meta.host != row.host),
        ("orig_dst", meta.orig_dst != row.orig_dst),
        ("protocol", meta.protocol != row.protocol),
        ("pid", meta.process.pid != row.pid),
        ("comm", meta.process.comm != row.comm),
    ];
    mismatches
        .iter()
        .find(|(_, differs)| *differs)
        .map(|(field, _)| format!("its {field} differs from the start record"))
}
