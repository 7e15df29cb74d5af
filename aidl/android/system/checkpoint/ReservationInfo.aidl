/*
 * Copyright (C) 2026 The checkpointd authors
 * SPDX-License-Identifier: Apache-2.0
 */

package android.system.checkpoint;

/** Space held free for the next checkpoint by a preallocated file. Since version 2. */
@VintfStability
parcelable ReservationInfo {
    /** The mount point the reservation is on. */
    @utf8InCpp String mountPoint;
    /** The reservation file. */
    @utf8InCpp String path;
    /** Bytes reserved. */
    long bytes;
    /** When it was made, seconds since the Unix epoch. */
    long createdUnixSecs;
}
