//! The model-based crash checker behind `fs_check.rs`, one module per part:
//! its command line ([`args`]), the worker processes ([`workers`]) and
//! their workloads ([`workload`] on the file system, [`sqlite`] on two
//! databases, [`chaos`] across hosts), the journal they keep ([`journal`]),
//! the model a crash is checked against ([`model`]), the checks that the
//! checker can fail ([`selftest`]), and the trials that put it together
//! ([`trial`]).

pub mod args;
pub mod chaos;
pub mod journal;
pub mod model;
pub mod selftest;
pub mod sqlite;
pub mod trial;
pub mod workers;
pub mod workload;
