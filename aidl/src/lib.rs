//! The `android.system.checkpoint` stable AIDL interface, compiled for rsbinder.
