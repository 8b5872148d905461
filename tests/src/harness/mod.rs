//! The end-to-end harness: a throwaway PostgreSQL, the proxy in-process, real clients.
//! Holds no assertions about product behaviour.

pub mod certs;
pub mod client;
pub mod fault;
pub mod pg;
pub mod proxy;
pub mod recorder;
