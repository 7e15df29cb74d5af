///////////////////////////////////////////////////////////////////////////////
// THIS FILE IS IMMUTABLE. DO NOT EDIT IN ANY CASE.                          //
///////////////////////////////////////////////////////////////////////////////
// This file is an API dump of android.system.checkpoint (see aidl/tests/api_freeze.rs).
package android.system.checkpoint;
@VintfStability
@Backing(type="int")
enum EstimateBasis {
    TRACE = 0,
    HISTORY = 1,
    DECLARED = 2,
    HISTORY_AND_DECLARED = 3,
    DEFAULT = 4,
}
