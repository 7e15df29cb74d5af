//! dm-snapshot's persistent exception store (the COW device of a `snapshot` target with `P`):
//! its on-disk format, a strict parser, and the offline merge that copies every saved chunk
//! back onto the origin before it is mounted.
#![forbid(unsafe_code)]
