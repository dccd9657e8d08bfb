//! Test guests: the built-in 64-bit workloads and the project's boot sectors,
//! generated in Rust, and the checks that verify their RAM.
//!
//! (Being built.)
