//! Interception tests.
