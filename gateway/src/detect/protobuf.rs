//! The protobuf wire format, walked without a schema: which length-delimited
//! fields (strings, bytes, embedded messages, packed scalars) a buffer holds
//! if it is a well-formed message at all.

/// A length-delimited field of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LenField {
    /// The field number.
    pub number: u64,
    /// Offset of the field's first content byte in the message.
    pub start: usize,
    /// Offset just past its last content byte.
    pub end: usize,
}

/// Groups nested deeper than this are taken for garbage.
const MAX_GROUP_DEPTH: usize = 32;

fn varint(data: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *data.get(*pos)?;
        *pos += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The length-delimited fields of `msg` if the whole buffer parses as one
/// message (every tag valid, every length inside the buffer, groups
/// balanced); `None` otherwise. An empty buffer is no message.
pub(crate) fn len_fields(msg: &[u8]) -> Option<Vec<LenField>> {
    if msg.is_empty() {
        return None;
    }
    let mut fields = Vec::new();
    let mut groups: Vec<u64> = Vec::new();
    let mut pos = 0;
    while pos < msg.len() {
        let tag = varint(msg, &mut pos)?;
        let number = tag >> 3;
        if number == 0 || number > (1 << 29) - 1 {
            return None;
        }
        match tag & 7 {
            0 => {
                varint(msg, &mut pos)?;
            }
            1 => pos = pos.checked_add(8).filter(|&p| p <= msg.len())?,
            2 => {
                let len = usize::try_from(varint(msg, &mut pos)?).ok()?;
                let end = pos.checked_add(len).filter(|&e| e <= msg.len())?;
                fields.push(LenField { number, start: pos, end });
                pos = end;
            }
            3 => {
                if groups.len() >= MAX_GROUP_DEPTH {
                    return None;
                }
                groups.push(number);
            }
            4 => {
                if groups.pop() != Some(number) {
                    return None;
                }
            }
            5 => pos = pos.checked_add(4).filter(|&p| p <= msg.len())?,
            _ => return None,
        }
    }
    groups.is_empty().then_some(fields)
}

/// Protobuf encoding helpers for tests.
#[cfg(test)]
pub(crate) mod encode {
    /// Appends a varint.
    pub fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// Appends a length-delimited field.
    pub fn bytes_field(number: u64, data: &[u8], out: &mut Vec<u8>) {
        varint(number << 3 | 2, out);
        varint(data.len() as u64, out);
        out.extend_from_slice(data);
    }

    /// Appends a varint field.
    pub fn varint_field(number: u64, v: u64, out: &mut Vec<u8>) {
        varint(number << 3, out);
        varint(v, out);
    }
}

#[cfg(test)]
mod tests {
    use super::{encode::*, *};

    #[test]
    fn walks_fields_and_rejects_garbage() {
        let mut inner = Vec::new();
        bytes_field(2, b"hello", &mut inner);
        let mut msg = Vec::new();
        varint_field(1, 300, &mut msg);
        bytes_field(3, &inner, &mut msg);
        msg.extend_from_slice(&[0x2d, 1, 2, 3, 4]); // field 5, fixed32
        let fields = len_fields(&msg).unwrap();
        assert_eq!(fields.len(), 1);
        assert_eq!(fields[0].number, 3);
        assert_eq!(&msg[fields[0].start..fields[0].end], &inner[..]);
        assert_eq!(len_fields(&inner).unwrap()[0].number, 2);
        assert!(len_fields(b"").is_none());
        assert!(len_fields(&msg[..msg.len() - 1]).is_none());
        assert!(len_fields(&[0x0a, 0x05, b'a']).is_none());
        assert!(len_fields(&[0x07]).is_none());
        assert!(len_fields(&[0x0b, 0x08, 0x01, 0x0c]).unwrap().is_empty());
        assert!(len_fields(&[0x0b]).is_none());
    }
}
