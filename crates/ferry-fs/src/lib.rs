//! ferry-fs
