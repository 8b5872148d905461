//! pgveil's end-to-end tests: a real PostgreSQL, real clients, the proxy in-process.
//! One test binary; the harness is public so benches and scripts can reuse it.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test and bench code: a panic is a failure report")]

pub mod harness;

#[cfg(test)]
mod access;
#[cfg(test)]
mod blocking;
#[cfg(test)]
mod cli;
#[cfg(test)]
mod core;
#[cfg(test)]
mod deploy;
#[cfg(test)]
mod drift;
#[cfg(test)]
mod drivers;
#[cfg(test)]
mod dump;
#[cfg(test)]
mod false_blocks;
#[cfg(test)]
mod faults;
#[cfg(test)]
mod hardening;
#[cfg(test)]
mod leaks;
#[cfg(test)]
mod mask_sql;
#[cfg(test)]
mod mask_types;
#[cfg(test)]
mod masking;
#[cfg(test)]
mod names;
#[cfg(test)]
mod relay_diff;
#[cfg(test)]
mod reload;
#[cfg(test)]
mod scram;
#[cfg(test)]
mod substitution;
