//! Durable per-device backend records in the metadata directory.
//!
//! TO BE BUILT (issue 9 §3).
