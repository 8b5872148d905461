//! pgveil's policy side, pure and I/O-free: the rules file model, loading and validation with
//! positions, the compiled policy, statement analysis and the masks.

pub mod catalog;
pub mod compile;
pub mod diagnostic;
pub mod file;
pub mod mask;
pub mod names;
pub mod policy;
pub mod sql;
pub mod tree;
pub mod types;

pub use compile::{CompileOptions, compile};
pub use diagnostic::Diagnostic;
pub use mask::{HashKey, Mask};
pub use names::{ColumnName, RoleName, TableName};
pub use policy::{Identity, Mode, Policy, SessionPolicy};
