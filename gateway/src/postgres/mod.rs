//! PostgreSQL: what the PostgreSQL handler (`proxy::postgres`) needs to
//! translate a session's messages into the gate's facts, and the gate's
//! decisions back into PostgreSQL messages.
//!
//! * [`codec`]: message framing and parsing, without I/O.
//! * [`cancel`]: the cancel keys the gateway issues, mapped to the
//!   upstream sessions' own.
//! * [`rows`]: masking of result rows (DataRow) by the policy's `mask`.
//! * [`sql`]: statements classified with PostgreSQL's own grammar, for the
//!   policy.

pub mod cancel;
pub mod codec;
pub mod rows;
pub mod sql;
