//! virtio-fs: granted host directories served to the guest over FUSE
//! (`fuse-backend-rs`'s server and passthrough file system, behind
//! [`share::Share`]'s checks).

pub mod device;
#[cfg(any(test, feature = "fuzzing"))]
pub mod raw;
pub mod share;
pub mod window;

#[cfg(test)]
mod tests;
