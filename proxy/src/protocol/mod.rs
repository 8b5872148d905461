//! The PostgreSQL wire format, sans-IO: framing, startup packets, typed views of the messages we
//! inspect and encoders for the messages we originate. No sockets, no policy, no logging.
// Client bytes pass through here: no panic may be reachable from them (issue #9).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod frame;
pub mod messages;
pub mod startup;
pub mod wire;

pub use frame::{Direction, Frame, FrameError, decode};
