///////////////////////////////////////////////////////////////////////////////
// THIS FILE IS IMMUTABLE. DO NOT EDIT IN ANY CASE.                          //
///////////////////////////////////////////////////////////////////////////////
// This file is an API dump of android.system.checkpoint (see aidl/tests/api_freeze.rs).
package android.system.checkpoint;
@VintfStability
@Backing(type="int")
enum HistoryEventKind {
    OTHER = 0,
    CHECKPOINT_STARTED = 1,
    BOOT_ATTEMPT = 2,
    COMMITTED = 3,
    ABORTED = 4,
    RESTORED = 5,
    ROLLBACK_NEEDED = 6,
    RESET = 7,
}
