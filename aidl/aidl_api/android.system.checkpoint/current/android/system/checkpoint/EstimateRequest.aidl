///////////////////////////////////////////////////////////////////////////////
// THIS FILE IS IMMUTABLE. DO NOT EDIT IN ANY CASE.                          //
///////////////////////////////////////////////////////////////////////////////
// This file is an API dump of android.system.checkpoint (see aidl/tests/api_freeze.rs).
package android.system.checkpoint;
@VintfStability
parcelable EstimateRequest {
    @nullable ParcelFileDescriptor trace;
    long[] declaredBytes;
    @utf8InCpp String mountPoint;
}
