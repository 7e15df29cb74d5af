//! Block devices addressed in bytes, and a generic copy plan: "copy these extents from a
//! source device to a destination device, with a hazard check and a caller-supplied commit
//! point". The dm-bow restore and the offline dm-snapshot merge both apply their plans here.
#![forbid(unsafe_code)]
