//! Masking of result rows: what the policy's `mask` does to the DataRow
//! messages of a statement it masks, one row at a time (a result set is
//! never buffered).
//!
//! A [`RowMask`] is the union of the masks that apply to one result (a
//! statement's own, and for `EXECUTE` / `FETCH` those of the statements
//! and cursors it may run). Given the result's RowDescription it becomes a
//! [`RowPlan`]: one decision per column, from its name, type and format.
//!
//! * A column masked whole (its name matches a `columns` glob): a value in
//!   text format becomes [`COLUMN_MASK`]; in binary format a text-like type
//!   (`text`, `varchar`, `bpchar`, `name`, `json`, `xml`, `bytea`,
//!   `unknown`) becomes [`COLUMN_MASK`] too, `jsonb` the JSON string of it,
//!   and any other type NULL (no text fits an `int4`). NULL stays NULL.
//! * Every other column, when the mask has detector rules or patterns:
//!   text-format and text-like binary values are masked where keys stand
//!   (`[MASKED:<rule>]`); a binary value of another type (an array, a
//!   record) in which the masker finds anything becomes NULL, since its
//!   bytes cannot be edited in place without breaking its structure.
//!
//! Every length prefix (value and message) is computed anew.

use std::{collections::BTreeMap, sync::Arc};

use bytes::BytesMut;

use super::codec::{self, CodecError, Field};
use crate::{enforce::ResultMask, mask::Masker};

/// What a value of a column masked whole becomes (text, and text-like
/// binary).
pub const COLUMN_MASK: &[u8] = b"[MASKED:column]";
/// The same as a binary `jsonb` value: version 1, then a JSON string.
const JSONB_COLUMN_MASK: &[u8] = b"\x01\"[MASKED:column]\"";

/// Type OIDs whose binary format is their text (or raw bytes, `bytea`) of
/// any length (not `"char"`: one byte).
const TEXT_LIKE: &[u32] = &[
    17,   // bytea
    19,   // name
    25,   // text
    114,  // json
    142,  // xml
    705,  // unknown
    1042, // bpchar
    1043, // varchar
];
/// `jsonb`: binary format is a version byte, then the text.
const JSONB: u32 = 3802;

/// The masks that apply to one result.
#[derive(Debug, Clone)]
pub struct RowMask {
    masks: Vec<Arc<ResultMask>>,
}

impl RowMask {
    /// The union of `masks`; `None` when there are none.
    pub fn union(masks: impl IntoIterator<Item = Arc<ResultMask>>) -> Option<RowMask> {
        let mut all: Vec<Arc<ResultMask>> = Vec::new();
        for m in masks {
            if !all.iter().any(|a| Arc::ptr_eq(a, &m)) {
                all.push(m);
            }
        }
        (!all.is_empty()).then_some(RowMask { masks: all })
    }

    /// The statements' masks this is the union of.
    pub fn parts(&self) -> impl Iterator<Item = Arc<ResultMask>> + '_ {
        self.masks.iter().cloned()
    }

    /// The value maskers; `Err` when one did not compile (the rows must then
    /// not be relayed).
    fn maskers(&self) -> Result<Vec<Arc<Masker>>, String> {
        let mut out: Vec<Arc<Masker>> = Vec::new();
        for m in &self.masks {
            match &m.values {
                Some(Ok(masker)) if !out.iter().any(|o| Arc::ptr_eq(o, masker)) => out.push(Arc::clone(masker)),
                Some(Err(e)) => return Err(e.clone()),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Whether the rows cannot be masked (a masker that did not compile):
    /// the reason.
    pub fn unusable(&self) -> Option<String> {
        self.maskers().err()
    }

    /// The per-column plan for a result described by `fields`.
    pub fn plan(&self, fields: &[Field]) -> Result<RowPlan, String> {
        let maskers = self.maskers()?;
        let columns = fields
            .iter()
            .map(|f| {
                let text_like = !f.binary || TEXT_LIKE.contains(&f.type_oid);
                if self.masks.iter().any(|m| m.masks_column(&f.name)) {
                    if text_like {
                        Column::Replace(COLUMN_MASK)
                    } else if f.type_oid == JSONB {
                        Column::Replace(JSONB_COLUMN_MASK)
                    } else {
                        Column::Null
                    }
                } else if maskers.is_empty() {
                    Column::Pass
                } else if text_like {
                    Column::MaskText { skip: 0 }
                } else if f.type_oid == JSONB {
                    Column::MaskText { skip: 1 }
                } else {
                    Column::NullIfFound
                }
            })
            .collect();
        Ok(RowPlan { columns, maskers })
    }
}

/// What happens to one column's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    /// Unchanged.
    Pass,
    /// Replaced by these bytes (NULL stays NULL).
    Replace(&'static [u8]),
    /// Replaced by NULL.
    Null,
    /// Keys inside masked, after the first `skip` bytes (a format header).
    MaskText { skip: usize },
    /// NULL when the maskers find anything, else unchanged.
    NullIfFound,
}

/// How one result's rows are masked.
#[derive(Debug)]
pub struct RowPlan {
    columns: Vec<Column>,
    maskers: Vec<Arc<Masker>>,
}

/// What a result's masking replaced, for the recording (never the values).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MaskCounts {
    /// Rows rewritten.
    pub rows: u64,
    /// Values of columns masked whole.
    pub columns: u64,
    /// Values that became NULL because a key was inside a binary value.
    pub nulled: u64,
    /// Matches masked inside values, by rule.
    pub rules: BTreeMap<String, u64>,
}

impl MaskCounts {
    /// Whether anything was masked.
    pub fn any(&self) -> bool {
        self.columns > 0 || self.nulled > 0 || !self.rules.is_empty()
    }
}

impl RowPlan {
    /// Whether every column passes unchanged (rows need not be parsed).
    pub fn is_noop(&self) -> bool {
        self.columns.iter().all(|c| *c == Column::Pass)
    }

    /// Appends the DataRow with body `body`, masked, to `out`.
    pub fn mask_row(&self, body: &[u8], out: &mut BytesMut, counts: &mut MaskCounts) -> Result<(), CodecError> {
        let values = codec::data_row(body)?;
        if values.len() != self.columns.len() {
            return Err(CodecError::Malformed { tag: "D".into(), detail: "column count differs from its description" });
        }
        counts.rows += 1;
        let mut masked: Vec<Option<std::borrow::Cow<'_, [u8]>>> = Vec::with_capacity(values.len());
        for (value, column) in values.into_iter().zip(&self.columns) {
            let Some(value) = value else {
                masked.push(None);
                continue;
            };
            let new = match *column {
                Column::Pass => Some(value.into()),
                Column::Replace(with) => {
                    counts.columns += 1;
                    Some(with.into())
                }
                Column::Null => {
                    counts.columns += 1;
                    None
                }
                Column::MaskText { skip } => {
                    let skip = skip.min(value.len());
                    match self.mask_value(&value[skip..], counts) {
                        Some(changed) => {
                            let mut v = value[..skip].to_vec();
                            v.extend_from_slice(&changed);
                            Some(v.into())
                        }
                        None => Some(value.into()),
                    }
                }
                Column::NullIfFound => match self.mask_value(value, counts) {
                    Some(_) => {
                        counts.nulled += 1;
                        None
                    }
                    None => Some(value.into()),
                },
            };
            masked.push(new);
        }
        codec::put_data_row(out, masked.iter().map(|v| v.as_deref()));
        Ok(())
    }

    /// `value` with every masker applied, counting the matches; `None` when
    /// nothing matched.
    fn mask_value(&self, value: &[u8], counts: &mut MaskCounts) -> Option<Vec<u8>> {
        let mut current: Option<Vec<u8>> = None;
        for masker in &self.maskers {
            let (out, found) = masker.mask_bytes(current.as_deref().unwrap_or(value));
            if found.is_empty() {
                continue;
            }
            for m in found {
                *counts.rules.entry(m.rule.to_string()).or_default() += 1;
            }
            current = Some(out);
        }
        current
    }
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};

    use super::*;
    use crate::{
        detect::Detector,
        mask::{MaskRules, MaskSpec},
    };

    fn field(name: &str, type_oid: u32, binary: bool) -> Field {
        Field { name: name.into(), type_oid, binary }
    }

    fn row(values: &[Option<&[u8]>]) -> Bytes {
        let mut out = BytesMut::new();
        codec::put_data_row(&mut out, values.iter().copied());
        let mut frame = codec::decode_frame(&mut out, 1 << 20).expect("frame").expect("whole");
        assert_eq!(frame.tag, b'D');
        std::mem::take(&mut frame.body)
    }

    fn masked(plan: &RowPlan, body: &[u8], counts: &mut MaskCounts) -> Vec<Option<Vec<u8>>> {
        let mut out = BytesMut::new();
        plan.mask_row(body, &mut out, counts).expect("masks");
        let frame = codec::decode_frame(&mut out, 1 << 20).expect("frame").expect("one whole message");
        assert!(out.is_empty(), "exactly one message, its length prefix right");
        codec::data_row(&frame.body).expect("parses").into_iter().map(|v| v.map(<[u8]>::to_vec)).collect()
    }

    fn columns_only(globs: &[&str]) -> RowMask {
        let mask = ResultMask::new(globs.iter().map(|g| g.to_string()).collect(), None);
        RowMask::union([Arc::new(mask)]).expect("a mask")
    }

    #[test]
    fn columns_masked_whole_by_format_and_type() {
        let mask = columns_only(&["ssn", "*_token"]);
        let fields = [
            field("id", 23, true),
            field("ssn", 25, false),
            field("api_token", 25, true),
            field("ssn", 23, true),
            field("ssn", 3802, true),
            field("ssn", 23, false),
            field("name", 25, false),
        ];
        let plan = mask.plan(&fields).expect("plan");
        assert!(!plan.is_noop());
        let mut counts = MaskCounts::default();
        let body = row(&[
            Some(&7i32.to_be_bytes()),
            Some(b"123-45-6789"),
            Some(b"tok"),
            Some(&9i32.to_be_bytes()),
            Some(b"\x01{\"a\": 1}"),
            Some(b"42"),
            None,
        ]);
        let got = masked(&plan, &body, &mut counts);
        assert_eq!(
            got,
            vec![
                Some(7i32.to_be_bytes().to_vec()),
                Some(COLUMN_MASK.to_vec()),
                Some(COLUMN_MASK.to_vec()),
                None,
                Some(JSONB_COLUMN_MASK.to_vec()),
                Some(COLUMN_MASK.to_vec()),
                None,
            ]
        );
        assert_eq!(counts.columns, 5);
        assert_eq!(counts.rows, 1);
        // NULL in a masked column stays NULL and is not counted.
        let mut counts = MaskCounts::default();
        let got = masked(&plan, &row(&[None, None, Some(b""), None, None, None, Some(b"x")]), &mut counts);
        assert_eq!(got[1], None);
        assert_eq!(got[2], Some(COLUMN_MASK.to_vec()), "an empty value is a value");
        assert_eq!(got[6], Some(b"x".to_vec()));
        assert_eq!(counts.columns, 1);
    }

    #[test]
    fn zero_columns_and_malformed_rows() {
        let mask = columns_only(&["ssn"]);
        let plan = mask.plan(&[]).expect("plan");
        let mut counts = MaskCounts::default();
        assert_eq!(masked(&plan, &row(&[]), &mut counts), Vec::<Option<Vec<u8>>>::new());
        let plan = mask.plan(&[field("ssn", 25, false)]).expect("plan");
        let mut out = BytesMut::new();
        for bad in [
            &b""[..],
            b"\x00",
            b"\x00\x01\x00\x00",
            b"\x00\x01\x00\x00\x00\x05abc",
            b"\x00\x01\xff\xff\xff\xfe",
            b"\x00\x01\xff\xff\xff\xffx",
            b"\xff\xff",
            b"\x00\x02\xff\xff\xff\xff\xff\xff\xff\xff",
        ] {
            assert!(plan.mask_row(bad, &mut out, &mut counts).is_err(), "{bad:?}");
        }
        assert!(out.is_empty(), "nothing written for a malformed row");
    }

    #[test]
    fn keys_inside_values_are_masked() {
        let detector = Arc::new(Detector::builtin().expect("detector"));
        let spec = MaskSpec { rules: MaskRules::All, ..MaskSpec::default() };
        let masker = Arc::new(Masker::new(detector, &spec).expect("masker"));
        let mask = RowMask::union([Arc::new(ResultMask::new(vec!["ssn".into()], Some(Ok(masker))))]).expect("mask");
        // A synthetic GitHub token (built here, never printed).
        let random = b"Q2w3E4r5T6y7U8i9O0pAsDfGhJkLzX";
        let check = crate::detect::confirm::base62_crc32(random);
        let key = format!("ghp_{}{}", String::from_utf8_lossy(random), String::from_utf8_lossy(&check));
        let note = format!("deploy with {key} today");
        let mut array = b"\x00\x00\x00\x01".to_vec();
        array.extend_from_slice(note.as_bytes());
        let fields =
            [field("note", 25, false), field("note", 25, true), field("arr", 1009, true), field("n", 23, true)];
        let plan = mask.plan(&fields).expect("plan");
        let mut counts = MaskCounts::default();
        let body = row(&[Some(note.as_bytes()), Some(note.as_bytes()), Some(&array), Some(&5i32.to_be_bytes())]);
        let got = masked(&plan, &body, &mut counts);
        for v in &got[..2] {
            let v = String::from_utf8(v.clone().expect("a value")).expect("utf8");
            assert!(!v.contains(&key), "the key is masked");
            assert!(v.starts_with("deploy with [MASKED:") && v.ends_with(" today"), "the rest stays");
        }
        assert_eq!(got[2], None, "a binary array holding a key becomes NULL");
        assert_eq!(got[3], Some(5i32.to_be_bytes().to_vec()), "a number without a key passes");
        assert_eq!(counts.nulled, 1);
        assert_eq!(counts.rules.values().sum::<u64>(), 3);
    }
}
