/*
 * Copyright (C) 2026 The checkpointd authors
 * SPDX-License-Identifier: Apache-2.0
 */

package android.system.checkpoint;

/** The backend that checkpoints one device, and why it was chosen. Since version 2. */
@VintfStability
parcelable BackendInUse {
    /** The device's mount point. */
    @utf8InCpp String mountPoint;
    /** The backend object's name in the configuration (e.g. "block" or "block@data"). */
    @utf8InCpp String name;
    /** Its type: "bow", "snapshot", "f2fs" or "test-null". */
    @utf8InCpp String type;
    /** Why: the `auto` selection's reason, or "configured" when named explicitly. */
    @utf8InCpp String reason;
}
