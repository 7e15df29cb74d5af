///////////////////////////////////////////////////////////////////////////////
// THIS FILE IS IMMUTABLE. DO NOT EDIT IN ANY CASE.                          //
///////////////////////////////////////////////////////////////////////////////
// This file is an API dump of android.system.checkpoint (see aidl/tests/api_freeze.rs).
package android.system.checkpoint;
@VintfStability
parcelable BackendInUse {
    @utf8InCpp String mountPoint;
    @utf8InCpp String name;
    @utf8InCpp String type;
    @utf8InCpp String reason;
}
