//! Tessera's integration tests: one test binary, one module per area.

mod agent_e2e;
mod agents;
mod cli;
mod cli_e2e;
mod cluster;
mod compose;
mod deploy;
mod dev;
mod nemesis;
mod observability;
mod python_client;
mod security;
