//! A transparent interception gateway for shared CI runner hosts.
//!
//! Data flows one way: an intercepted connection ([`intercept`]) is
//! attributed to the process that made it ([`process`]), handed to the proxy
//! ([`proxy`]) which terminates TLS where configured ([`tls`]), speaks HTTP
//! ([`http`]), looks for static keys ([`detect`]), enforces and records
//! findings ([`findings`]), and forwards to the original destination.

pub mod api;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod detect;
pub mod enforce;
pub mod event;
pub mod findings;
pub mod http;
pub mod identity;
pub mod policy;
pub mod intercept;
pub mod process;
pub mod proxy;
pub mod relay;
pub mod tls;
