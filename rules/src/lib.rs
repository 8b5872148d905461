//! pgveil policy.
