//! checkpointd's state store, boot-attempt policy and boot control.
#![forbid(unsafe_code)]
