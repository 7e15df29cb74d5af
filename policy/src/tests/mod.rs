//! Tests of the policy crate: the reference model and its proptest, and unit tests.

mod bootctl_tests;
mod fakes;
mod model;
mod policy_tests;
mod seam_tests;
mod store_tests;
