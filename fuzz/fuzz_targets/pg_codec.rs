//! The PostgreSQL wire codec: startup packets, then message frames, each
//! parsed as the proxy parses it (frontend messages, RowDescription,
//! DataRow, ErrorResponse, CommandComplete, password).
#![no_main]
use bytes::BytesMut;
use gateway::postgres::codec::{
    command_tag, data_row, decode_frame, decode_startup, error_fields, looks_like_startup, password, row_description,
    Frontend,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = looks_like_startup(data);
    let mut buf = BytesMut::from(data);
    if data.first() == Some(&0) {
        let _ = decode_startup(&mut buf);
    }
    let before = buf.len();
    while let Ok(Some(frame)) = decode_frame(&mut buf, 1 << 16) {
        let _ = Frontend::parse(&frame);
        match frame.tag {
            b'T' => {
                let _ = row_description(&frame.body);
            }
            b'D' => {
                if let Ok(values) = data_row(&frame.body) {
                    for v in values.into_iter().flatten() {
                        assert!(v.len() <= frame.body.len());
                    }
                }
            }
            b'E' | b'N' => {
                let _ = error_fields(&frame.body);
            }
            b'C' => {
                let _ = command_tag(&frame.body);
            }
            b'p' => {
                let _ = password(&frame);
            }
            _ => {}
        }
        assert!(buf.len() < before);
    }
});
