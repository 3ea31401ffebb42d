//! Benchmark support.

pub mod corpus;
pub mod gitleaks;
pub mod gosrc;
