///////////////////////////////////////////////////////////////////////////////
// THIS FILE IS IMMUTABLE. DO NOT EDIT IN ANY CASE.                          //
///////////////////////////////////////////////////////////////////////////////
// This file is an API dump of android.system.checkpoint (see aidl/tests/api_freeze.rs).
package android.system.checkpoint;
@VintfStability
@Backing(type="int")
enum CheckpointState {
    NONE = 0,
    PENDING = 1,
    CHECKPOINTING = 2,
    ROLLBACK_NEEDED = 3,
}
