///////////////////////////////////////////////////////////////////////////////
// THIS FILE IS IMMUTABLE. DO NOT EDIT IN ANY CASE.                          //
///////////////////////////////////////////////////////////////////////////////
// This file is an API dump of android.system.checkpoint (see aidl/tests/api_freeze.rs).
package android.system.checkpoint;
import android.system.checkpoint.EstimateBasis;
@VintfStability
parcelable BackupEstimate {
    @utf8InCpp String mountPoint;
    @utf8InCpp String backend;
    EstimateBasis basis = EstimateBasis.DEFAULT;
    long predictedBytes;
    long neededBytes;
    long freeBytes;
    long newDataBytes = -1;
    long shortfallBytes;
    long dataBytes;
    long overheadBytes;
    long marginBytes;
    long headroomBytes;
    int historySamples;
}
