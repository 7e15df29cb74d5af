// android.hardware.boot, version 1: the boot control HAL as Android declares it, rewritten for
// checkpointd's client and test fake. Wire compatibility rests on the package, the interface
// name, the order and signatures of the methods (they give the transaction codes) and the
// constant values; keep all of them exactly as they are. The frozen API is version 1 with hash
// 2400346954240a5de495a1debc81429dd012d7b7 (bootctl/build.rs stamps both).

package android.hardware.boot;

import android.hardware.boot.MergeStatus;

@VintfStability
interface IBootControl {
    /** Service-specific error code: the slot number is out of range. */
    const int INVALID_SLOT = -1;
    /** Service-specific error code: the HAL could not carry out the command. */
    const int COMMAND_FAILED = -2;

    /** The slot the bootloader boots next (the last setActiveBootSlot, if any). */
    int getActiveBootSlot();

    /** The slot this boot runs from. */
    int getCurrentSlot();

    /** How many slots the device has (2 for A/B). */
    int getNumberSlots();

    /** The Virtual A/B snapshot merge status kept by the bootloader. */
    MergeStatus getSnapshotMergeStatus();

    /** The partition-name suffix of a slot, e.g. "_a". */
    String getSuffix(in int slot);

    /** Whether the bootloader may boot the slot. */
    boolean isSlotBootable(in int slot);

    /** Whether the slot has been marked as booted successfully. */
    boolean isSlotMarkedSuccessful(in int slot);

    /** Marks the current slot as booted successfully. */
    void markBootSuccessful();

    /** Makes the slot the one booted next (it becomes bootable with fresh tries). */
    void setActiveBootSlot(in int slot);

    /** Marks the slot as not bootable. */
    void setSlotAsUnbootable(in int slot);

    /** Records the Virtual A/B snapshot merge status for the bootloader. */
    void setSnapshotMergeStatus(in MergeStatus status);
}
