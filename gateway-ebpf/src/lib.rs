//! Host-side placeholder: the programs live in the `gateway-ebpf` binary,
//! built for `bpfel-unknown-none` by `gateway/build.rs`.
#![no_std]
