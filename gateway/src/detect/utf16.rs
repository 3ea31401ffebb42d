//! UTF-16 text (JSON sent by some Windows and .NET clients) transcoded to
//! UTF-8 as it streams, so rules written for ASCII see the characters.

/// Byte order of UTF-16 text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endian {
    Little,
    Big,
}

/// Recognizes UTF-16 at the start of a text body: a byte-order mark
/// (returned with its length), or, without one, an ASCII `{`, `[`, `"` or
/// whitespace paired with a NUL byte, followed by another such pair.
pub(crate) fn sniff(head: &[u8]) -> Option<(Endian, usize)> {
    match head {
        [0xff, 0xfe, ..] => return Some((Endian::Little, 2)),
        [0xfe, 0xff, ..] => return Some((Endian::Big, 2)),
        _ => {}
    }
    let lead = |b: u8| matches!(b, b'{' | b'[' | b'"' | b' ' | b'\t' | b'\r' | b'\n');
    match head {
        [a, 0, c, 0, ..] if lead(*a) && c.is_ascii() && *c != 0 => Some((Endian::Little, 0)),
        [0, a, 0, c, ..] if lead(*a) && c.is_ascii() && *c != 0 => Some((Endian::Big, 0)),
        _ => None,
    }
}

/// Streaming UTF-16 to UTF-8 transcoder; unpaired surrogates become U+FFFD.
#[derive(Debug)]
pub(crate) struct Utf16Decoder {
    endian: Endian,
    odd: Option<u8>,
    high: Option<u16>,
}

impl Utf16Decoder {
    /// A decoder for text in this byte order.
    pub(crate) fn new(endian: Endian) -> Self {
        Self { endian, odd: None, high: None }
    }

    /// Transcodes `data`, appending UTF-8 to `out`.
    pub(crate) fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        for &b in data {
            let Some(first) = self.odd.take() else {
                self.odd = Some(b);
                continue;
            };
            let unit = match self.endian {
                Endian::Little => u16::from_le_bytes([first, b]),
                Endian::Big => u16::from_be_bytes([first, b]),
            };
            self.unit(unit, out);
        }
    }

    /// Ends the text; a dangling byte or high surrogate becomes U+FFFD.
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) {
        if self.odd.take().is_some() || self.high.take().is_some() {
            push_char('\u{FFFD}', out);
        }
    }

    fn unit(&mut self, unit: u16, out: &mut Vec<u8>) {
        let c = match (self.high.take(), unit) {
            (None, 0xD800..=0xDBFF) => {
                self.high = Some(unit);
                return;
            }
            (Some(high), 0xDC00..=0xDFFF) => {
                char::from_u32(0x10000 + ((u32::from(high) - 0xD800) << 10) + (u32::from(unit) - 0xDC00))
            }
            (Some(_), 0xD800..=0xDBFF) => {
                push_char('\u{FFFD}', out);
                self.high = Some(unit);
                return;
            }
            (Some(_), _) => {
                push_char('\u{FFFD}', out);
                char::from_u32(u32::from(unit))
            }
            (None, _) => char::from_u32(u32::from(unit)),
        };
        push_char(c.unwrap_or('\u{FFFD}'), out);
    }
}

fn push_char(c: char, out: &mut Vec<u8>) {
    let mut buf = [0u8; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

/// Transcodes a whole buffer.
pub(crate) fn to_utf8(data: &[u8], endian: Endian) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 2 + 4);
    let mut d = Utf16Decoder::new(endian);
    d.feed(data, &mut out);
    d.finish(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_and_transcodes_both_orders() {
        let text = "{\"k\": \"v\u{1F600}é\"}";
        let le: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let be: Vec<u8> = text.encode_utf16().flat_map(u16::to_be_bytes).collect();
        assert_eq!(sniff(&le), Some((Endian::Little, 0)));
        assert_eq!(sniff(&be), Some((Endian::Big, 0)));
        assert_eq!(to_utf8(&le, Endian::Little), text.as_bytes());
        assert_eq!(to_utf8(&be, Endian::Big), text.as_bytes());
        assert_eq!(sniff(b"{\"a\":1}"), None);
        assert_eq!(sniff(&[0x08, 0x00, 0x10, 0x01]), None);
    }
}
