///////////////////////////////////////////////////////////////////////////////
// THIS FILE IS IMMUTABLE. DO NOT EDIT IN ANY CASE.                          //
///////////////////////////////////////////////////////////////////////////////
// This file is an API dump of android.system.checkpoint (see aidl/tests/api_freeze.rs).
package android.system.checkpoint;
import android.system.checkpoint.CheckpointState;
import android.system.checkpoint.RestoreOutcome;
@VintfStability
parcelable CheckpointStatus {
    CheckpointState state = CheckpointState.NONE;
    int attemptsUsed;
    int attemptsLeft;
    int budget;
    @utf8InCpp String slotSuffix;
    @utf8InCpp String[] backends;
    @utf8InCpp String[] devices;
    long backupBytesUsed;
    long backupBytesFree;
    @nullable RestoreOutcome lastRestore;
}
