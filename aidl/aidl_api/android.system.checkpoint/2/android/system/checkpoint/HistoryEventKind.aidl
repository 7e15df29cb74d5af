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
    COMMIT_FAILED = 4,
    ABORTED = 5,
    RESTORED = 6,
    ROLLBACK_ACKNOWLEDGED = 7,
    ROLLBACK_SLOT_SWITCH = 8,
    RECOVERY = 9,
}
