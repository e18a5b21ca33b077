//! Tessera's integration tests: one test binary, one module per area.

mod agents;
mod cli;
mod cluster;
