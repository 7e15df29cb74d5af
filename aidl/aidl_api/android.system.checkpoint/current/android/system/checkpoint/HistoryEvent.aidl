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
    @utf8InCpp String slotSuffix;
    int attemptsLeft;
    long backupBytes;
    @utf8InCpp String detail;
}
