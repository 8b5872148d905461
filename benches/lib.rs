//! Benchmarks only; see frame.rs and mask.rs.
