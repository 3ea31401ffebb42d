//! The schema-less protobuf walker, differentially against `prost`'s wire
//! decoding: on a message built from arbitrary fields it must find exactly
//! the length-delimited fields, and on raw bytes it must not panic and
//! must stay inside the buffer.
#![no_main]
use arbitrary::Arbitrary;
use gateway::fuzzing::protobuf_len_fields;
use libfuzzer_sys::fuzz_target;
use prost::encoding::{decode_key, decode_varint, encode_key, encode_varint, WireType};

#[derive(Arbitrary, Debug)]
enum Field {
    Varint(u32, u64),
    Fixed64(u32, u64),
    Fixed32(u32, u32),
    Bytes(u32, Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Input {
    Valid(Vec<Field>),
    Raw(Vec<u8>),
}

fn number(n: u32) -> u32 {
    n % ((1 << 29) - 1) + 1
}

/// The top-level length-delimited fields `prost` decodes from `buf`.
fn prost_len_fields(mut buf: &[u8]) -> Option<Vec<(u64, usize, usize)>> {
    let total = buf.len();
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (n, wt) = decode_key(&mut buf).ok()?;
        match wt {
            WireType::Varint => {
                decode_varint(&mut buf).ok()?;
            }
            WireType::SixtyFourBit => buf = buf.get(8..)?,
            WireType::ThirtyTwoBit => buf = buf.get(4..)?,
            WireType::LengthDelimited => {
                let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
                let start = total - buf.len();
                buf = buf.get(len..)?;
                out.push((u64::from(n), start, start + len));
            }
            WireType::StartGroup | WireType::EndGroup => return None,
        }
    }
    Some(out)
}

fuzz_target!(|input: Input| match input {
    Input::Valid(fields) => {
        let mut msg = Vec::new();
        for f in &fields {
            match f {
                Field::Varint(n, v) => {
                    encode_key(number(*n), WireType::Varint, &mut msg);
                    encode_varint(*v, &mut msg);
                }
                Field::Fixed64(n, v) => {
                    encode_key(number(*n), WireType::SixtyFourBit, &mut msg);
                    msg.extend_from_slice(&v.to_le_bytes());
                }
                Field::Fixed32(n, v) => {
                    encode_key(number(*n), WireType::ThirtyTwoBit, &mut msg);
                    msg.extend_from_slice(&v.to_le_bytes());
                }
                Field::Bytes(n, b) => {
                    encode_key(number(*n), WireType::LengthDelimited, &mut msg);
                    encode_varint(b.len() as u64, &mut msg);
                    msg.extend_from_slice(b);
                }
            }
        }
        let walked = protobuf_len_fields(&msg);
        if msg.is_empty() {
            assert_eq!(walked, None, "an empty buffer is no message");
        } else {
            assert_eq!(walked, prost_len_fields(&msg), "walker and prost disagree");
        }
    }
    Input::Raw(data) => {
        if let Some(fields) = protobuf_len_fields(&data) {
            for (_, start, end) in fields {
                assert!(start <= end && end <= data.len());
            }
            // Where prost decodes the message (no groups), both agree.
            if let Some(reference) = prost_len_fields(&data) {
                assert_eq!(protobuf_len_fields(&data), Some(reference));
            }
        }
    }
});
