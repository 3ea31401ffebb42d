//! PostgreSQL: the wire protocol the PostgreSQL handler
//! (`proxy::postgres`) translates into the gate's facts.
//!
//! * [`codec`]: message framing and parsing, without I/O.
//! * [`cancel`]: the cancel keys the gateway issues, mapped to the
//!   upstream sessions' own.

pub mod cancel;
pub mod codec;
