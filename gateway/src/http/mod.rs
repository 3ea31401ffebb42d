//! HTTP/1.1 and HTTP/2 proxying (owned by the HTTP work stream).
