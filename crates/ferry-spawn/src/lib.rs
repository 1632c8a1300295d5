//! ferry-spawn
