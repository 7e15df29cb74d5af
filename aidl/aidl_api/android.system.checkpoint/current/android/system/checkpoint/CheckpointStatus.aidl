///////////////////////////////////////////////////////////////////////////////
// THIS FILE IS IMMUTABLE. DO NOT EDIT IN ANY CASE.                          //
///////////////////////////////////////////////////////////////////////////////
// This file is an API dump of android.system.checkpoint (see aidl/tests/api_freeze.rs).
package android.system.checkpoint;
import android.system.checkpoint.BackendInUse;
import android.system.checkpoint.CheckpointState;
import android.system.checkpoint.HistoryEvent;
import android.system.checkpoint.ReservationInfo;
@VintfStability
parcelable CheckpointStatus {
    CheckpointState state = CheckpointState.NONE;
    boolean isCheckpointing;
    boolean needsRollback;
    int budget;
    int attemptsUsed;
    int attemptsLeft = -1;
    @utf8InCpp String slotSuffix;
    @utf8InCpp String currentSlotSuffix;
    @utf8InCpp String[] backends;
    @utf8InCpp String[] devices;
    long backupBytesUsed = -1;
    long backupBytesFree = -1;
    @nullable HistoryEvent lastRestore;
    BackendInUse[] backendsInUse = {};
    @nullable ReservationInfo reservation;
    long lastEstimateNeededBytes = -1;
    long lastEstimatePredictedBytes = -1;
    long lastEstimateTimestampMs = -1;
    long checkpointEstimatedBytes = -1;
    long backupBytesHighWater = -1;
    long lastActualBytes = -1;
    long lastEstimatedBytes = -1;
}
