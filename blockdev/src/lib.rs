//! The OS boundary of checkpointd: the one crate with `unsafe` and ioctls.
