//! The PostgreSQL wire format, sans-IO: framing, startup packets, typed views of the messages we
//! inspect and encoders for the messages we originate. No sockets, no policy, no logging.

pub mod frame;
pub mod messages;
pub mod startup;
pub mod wire;

pub use frame::{Direction, Frame, FrameError, decode};
