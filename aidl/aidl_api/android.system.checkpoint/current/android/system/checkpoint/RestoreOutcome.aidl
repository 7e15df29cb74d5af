///////////////////////////////////////////////////////////////////////////////
// THIS FILE IS IMMUTABLE. DO NOT EDIT IN ANY CASE.                          //
///////////////////////////////////////////////////////////////////////////////
// This file is an API dump of android.system.checkpoint (see aidl/tests/api_freeze.rs).
package android.system.checkpoint;
@VintfStability
parcelable RestoreOutcome {
    @utf8InCpp String device;
    long timestampMs;
    int errorCode;
    @utf8InCpp String message;
}
