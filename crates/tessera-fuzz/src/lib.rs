//! Fuzz targets for every decoder that a peer or a user reaches, so that hostile bytes give an
//! error naming the field and never a panic, a hang or a corrupt state.
//!
//! Each target is a function `fn(&[u8])` that must not panic on any input:
//!
//! | target             | what it decodes                                                        |
//! |--------------------|------------------------------------------------------------------------|
//! | `spec_toml`        | a TOML job spec (`tessera spec check`, `tessera job submit SPEC.toml`) |
//! | `spec_one_line`    | the one-line form `tessera job submit --shards .. -- CMD`              |
//! | `grpc_requests`    | every request of every service, then what the server does with it      |
//! | `progress_line`    | the lines a training process writes to its progress file               |
//! | `cloud_metadata`   | AWS IMDSv2 and Azure IMDS answers, spot and Scheduled Events notices   |
//! | `raft_message`     | a raft-rs message from a peer, its entries and its snapshot            |
//! | `command_decode`   | a Raft log entry's command, then its apply                             |
//! | `snapshot_restore` | a `--restore-from` snapshot, its invariants, then a planning round     |
//!
//! Beyond "no panic", the targets check what must hold for every input: an accepted spec
//! validates and survives the wire and the log unchanged, every error names a field, a restored
//! state passes its invariants and snapshots to the same bytes. Requests run against a small
//! cluster state ([`fixture`]) the way the server runs them, so a hostile agent report reaches
//! `State::apply` and its invariant checks (debug assertions: the `fuzz` profile keeps them on).
//!
//! [`ALL`] lists the targets with their seed corpora (valid inputs built in code, so mutation
//! starts from the valid shape) and their dictionaries. [`driver`] is a stable-toolchain fuzzer
//! over them (seeded mutation, no coverage instrumentation; see `docs/fuzzing.md`); the
//! `fuzz/` directory at the repository root holds the same targets for `cargo fuzz`.

pub mod driver;
mod fixture;
pub mod mutate;
mod seeds;
mod targets;

pub use fixture::fixture;

/// One fuzz target, as the driver sees it.
pub struct Target {
    /// Its name, as in `fuzz/fuzz_targets/<name>.rs`.
    pub name: &'static str,
    /// Run one input. It returns a signature of what happened (which message, which error
    /// field): the driver keeps inputs that show a new one, as a stand-in for coverage.
    pub probe: fn(&[u8]) -> u64,
    /// Valid inputs built in code.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Tokens the mutator inserts: keywords, field names, boundary numbers.
    pub dictionary: &'static [&'static [u8]],
    /// Largest input the driver builds.
    pub max_len: usize,
    /// Inputs are protobuf messages after this many bytes (the selector of `grpc_requests`):
    /// the driver then also mutates them field by field, keeping the framing valid.
    pub protobuf_after: Option<usize>,
}

/// Every target, in the order the driver runs them.
pub const ALL: &[Target] = &[
    Target {
        name: "spec_toml",
        probe: targets::spec_toml,
        seeds: seeds::spec_toml,
        dictionary: seeds::DICT_TOML,
        max_len: 16 * 1024,
        protobuf_after: None,
    },
    Target {
        name: "spec_one_line",
        probe: targets::spec_one_line,
        seeds: seeds::spec_one_line,
        dictionary: seeds::DICT_ONE_LINE,
        max_len: 4 * 1024,
        protobuf_after: None,
    },
    Target {
        name: "grpc_requests",
        probe: targets::grpc_requests,
        seeds: seeds::grpc_requests,
        dictionary: seeds::DICT_PROTO,
        max_len: 16 * 1024,
        protobuf_after: Some(1),
    },
    Target {
        name: "progress_line",
        probe: targets::progress_line,
        seeds: seeds::progress_line,
        dictionary: seeds::DICT_JSON,
        max_len: 80 * 1024,
        protobuf_after: None,
    },
    Target {
        name: "cloud_metadata",
        probe: targets::cloud_metadata,
        seeds: seeds::cloud_metadata,
        dictionary: seeds::DICT_JSON,
        max_len: 16 * 1024,
        protobuf_after: None,
    },
    Target {
        name: "raft_message",
        probe: targets::raft_message,
        seeds: seeds::raft_message,
        dictionary: seeds::DICT_PROTO,
        max_len: 64 * 1024,
        protobuf_after: Some(0),
    },
    Target {
        name: "command_decode",
        probe: targets::command_decode,
        seeds: seeds::command_decode,
        dictionary: seeds::DICT_JSON,
        max_len: 16 * 1024,
        protobuf_after: None,
    },
    Target {
        name: "snapshot_restore",
        probe: targets::snapshot_restore,
        seeds: seeds::snapshot_restore,
        dictionary: seeds::DICT_JSON,
        max_len: 32 * 1024,
        protobuf_after: None,
    },
    Target {
        name: "peer_identity",
        probe: targets::peer_identity,
        seeds: seeds::peer_identity,
        dictionary: seeds::DICT_JSON,
        max_len: 8 * 1024,
        protobuf_after: None,
    },
];

/// The target named `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    ALL.iter().find(|t| t.name == name)
}

/// The TOML job spec parser (`tessera_core::spec::parse_toml`), on the bytes as UTF-8 (invalid
/// sequences replaced).
pub fn spec_toml(data: &[u8]) {
    targets::spec_toml(data);
}

/// The one-line form (`tessera_core::spec::OneLine::to_spec`): the bytes split at newlines into
/// an argument vector, read like `tessera job submit` reads its flags.
pub fn spec_one_line(data: &[u8]) {
    targets::spec_one_line(data);
}

/// Every gRPC request message, picked by the first byte, decoded with prost and then converted
/// and checked as the server does (`spec_from_proto`, `NodeInfo::try_from(&Register)`, the
/// paging and node checks, the agent reports' commands applied to the [`fixture`] state).
pub fn grpc_requests(data: &[u8]) {
    targets::grpc_requests(data);
}

/// The agent's progress-file parser (`tessera_agent::shard::ProgressParser`), fed the bytes
/// whole and in pieces (both must agree).
pub fn progress_line(data: &[u8]) {
    targets::progress_line(data);
}

/// The AWS IMDSv2 and Azure IMDS answer parsers (`tessera_agent::cloud::parse_*`), picked by
/// the first byte.
pub fn cloud_metadata(data: &[u8]) {
    targets::cloud_metadata(data);
}

/// A raft-rs message as `RaftService.Send` receives it, then its entries through the server's
/// state machine and its snapshot through restore.
pub fn raft_message(data: &[u8]) {
    targets::raft_message(data);
}

/// `Command::decode` (a Raft log entry), then the command applied to the [`fixture`] state.
pub fn command_decode(data: &[u8]) {
    targets::command_decode(data);
}

/// `State::restore` (the `--restore-from` file) with its invariants, then a planning round on
/// the restored state.
pub fn snapshot_restore(data: &[u8]) {
    targets::snapshot_restore(data);
}

/// What a peer presents about itself, picked by the first byte: a certificate's identity URIs
/// (`tessera_tls::identity::from_der`), a forwarded principal (`x-tessera-on-behalf` JSON) run
/// through `acl::authorize`, or an `authorization` header through the server's authenticator.
pub fn peer_identity(data: &[u8]) {
    targets::peer_identity(data);
}

/// A target as a plain function: any bytes in, a panic is a finding.
pub type TargetFn = fn(&[u8]);

/// Every target as a plain function, for `cargo fuzz` and other harnesses.
pub const TARGETS: &[(&str, TargetFn)] = &[
    ("spec_toml", spec_toml),
    ("spec_one_line", spec_one_line),
    ("grpc_requests", grpc_requests),
    ("progress_line", progress_line),
    ("cloud_metadata", cloud_metadata),
    ("raft_message", raft_message),
    ("command_decode", command_decode),
    ("snapshot_restore", snapshot_restore),
    ("peer_identity", peer_identity),
];

#[cfg(test)]
mod tests;
