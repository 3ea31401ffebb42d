//! Benchmark support.

pub mod corpus;
pub mod gosrc;
