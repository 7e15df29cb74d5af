// android.hardware.boot, version 1: the Virtual A/B merge status (values are part of the wire
// format).

package android.hardware.boot;

@VintfStability
@Backing(type="int")
enum MergeStatus {
    /** No snapshot or merge is in progress. */
    NONE = 0,
    /** The status is not known (e.g. the record was lost). */
    UNKNOWN = 1,
    /** Partitions are snapshotted; an update was applied but not merged. */
    SNAPSHOTTED = 2,
    /** The snapshots are being merged. */
    MERGING = 3,
    /** The update was cancelled. */
    CANCELLED = 4,
}
