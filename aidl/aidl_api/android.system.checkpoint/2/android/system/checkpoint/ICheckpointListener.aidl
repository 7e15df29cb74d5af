///////////////////////////////////////////////////////////////////////////////
// THIS FILE IS IMMUTABLE. DO NOT EDIT IN ANY CASE.                          //
///////////////////////////////////////////////////////////////////////////////
// This file is an API dump of android.system.checkpoint (see aidl/tests/api_freeze.rs).
package android.system.checkpoint;
import android.system.checkpoint.CheckpointState;
@VintfStability
oneway interface ICheckpointListener {
    void onStateChanged(CheckpointState state);
    void onRestoreProgress(long done, long total);
    void onLowSpace(long freeBytes);
}
