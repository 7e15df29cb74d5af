///////////////////////////////////////////////////////////////////////////////
// THIS FILE IS IMMUTABLE. DO NOT EDIT IN ANY CASE.                          //
///////////////////////////////////////////////////////////////////////////////
// This file is an API dump of android.system.checkpoint (see aidl/tests/api_freeze.rs).
package android.system.checkpoint;
import android.system.checkpoint.HistoryEventKind;
@VintfStability
parcelable HistoryEvent {
    long id;
    long timestampMs;
    HistoryEventKind kind = HistoryEventKind.OTHER;
    int requestedRetry = -2;
    long attemptsLeft = -1;
    int slot = -1;
    @utf8InCpp String device;
    @utf8InCpp String outcome;
    @utf8InCpp String message;
    long backupBytes = -1;
    long estimatedBytes = -1;
}
