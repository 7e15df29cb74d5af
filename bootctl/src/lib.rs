//! A client of Android's boot control HAL (`android.hardware.boot.IBootControl`).
