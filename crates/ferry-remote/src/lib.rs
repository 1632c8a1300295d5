//! ferry-remote
