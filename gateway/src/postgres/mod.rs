//! PostgreSQL: what the PostgreSQL handler (`proxy::postgres`) needs to
//! translate a session's messages into the gate's facts, and the gate's
//! decisions back into PostgreSQL messages.
//!
//! * [`codec`]: message framing and parsing, without I/O.
//! * [`encoded`]: keys in SQL's own encodings (escape strings, Unicode
//!   escapes, `bytea` formats, hex), decoded for the detector.
//! * [`clean`]: SQL texts a session already found clean (no key), so the
//!   same text again is not scanned and masked again.
//! * [`cancel`]: the cancel keys the gateway issues, mapped to the
//!   upstream sessions' own.
//! * [`rounds`]: what a session records, one record per round trip.
//! * [`rows`]: masking of result rows (DataRow) by the policy's `mask`.
//! * [`sql`]: statements classified with PostgreSQL's own grammar, for the
//!   policy.

pub mod cancel;
pub mod clean;
pub mod codec;
pub mod encoded;
pub mod rounds;
pub mod rows;
pub mod sql;
