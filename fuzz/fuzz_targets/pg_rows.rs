//! The PostgreSQL row masker: arbitrary columns (names, types, formats),
//! a mask of column globs and a value pattern, and DataRow bodies (valid
//! or raw). A row it masks is one well-formed DataRow with the same column
//! count.
#![no_main]
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use bytes::BytesMut;
use gateway::{
    detect::Detector,
    enforce::ResultMask,
    mask::{MaskPattern, MaskRules, MaskSpec, Masker},
    postgres::{
        codec::{data_row, decode_frame, put_data_row, Field},
        rows::{MaskCounts, RowMask},
    },
};
use libfuzzer_sys::fuzz_target;

const TYPES: &[u32] = &[16, 17, 19, 20, 23, 25, 114, 142, 705, 1007, 1042, 1043, 2249, 3802];
const NAMES: &[&str] = &["id", "ssn", "api_token", "name", "data", ""];

#[derive(Arbitrary, Debug)]
struct Column {
    name: u8,
    ty: u8,
    binary: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    columns: Vec<Column>,
    globs: u8,
    values: bool,
    raw: bool,
    row: Vec<Option<Vec<u8>>>,
    raw_body: Vec<u8>,
}

fn masker() -> Arc<Masker> {
    static M: OnceLock<Arc<Masker>> = OnceLock::new();
    M.get_or_init(|| {
        let detector = Arc::new(Detector::builtin().expect("built-in rules compile"));
        let spec = MaskSpec {
            rules: MaskRules::All,
            patterns: vec![MaskPattern { name: "k".into(), regex: "KEY[0-9A-F]{6}".into() }],
            json_fields: Vec::new(),
        };
        Arc::new(Masker::new(detector, &spec).expect("spec is valid"))
    })
    .clone()
}

fuzz_target!(|input: Input| {
    let fields: Vec<Field> = input
        .columns
        .iter()
        .take(16)
        .map(|c| Field {
            name: NAMES[usize::from(c.name) % NAMES.len()].to_owned(),
            type_oid: TYPES[usize::from(c.ty) % TYPES.len()],
            binary: c.binary,
        })
        .collect();
    let globs: Vec<String> = ["ssn", "*_token", "*"]
        .iter()
        .enumerate()
        .filter(|(i, _)| input.globs & (1 << i) != 0)
        .map(|(_, g)| g.to_string())
        .collect();
    let values = input.values.then(|| Ok(masker()));
    let Some(mask) = RowMask::union([Arc::new(ResultMask::new(globs, values))]) else { return };
    let Ok(plan) = mask.plan(&fields) else { return };
    let body: Vec<u8> = if input.raw {
        input.raw_body
    } else {
        let mut out = BytesMut::new();
        put_data_row(&mut out, input.row.iter().map(|v| v.as_deref()));
        out.split_off(5).to_vec()
    };
    let mut out = BytesMut::new();
    let mut counts = MaskCounts::default();
    if plan.mask_row(&body, &mut out, &mut counts).is_err() {
        return;
    }
    let frame = decode_frame(&mut out, usize::MAX).expect("a frame").expect("a whole frame");
    assert_eq!(frame.tag, b'D');
    assert!(out.is_empty(), "exactly one message");
    let masked = data_row(&frame.body).expect("the masked row parses");
    let original = data_row(&body).expect("a row the masker accepted parses");
    assert_eq!(masked.len(), original.len(), "column count kept");
});
