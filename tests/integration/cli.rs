//! The `tessera` binary as a user meets it.

use tessera_tests::{tessera, workspace_root};

#[test]
fn version_and_help() {
    let out = tessera(&["--version"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("tessera {}", env!("CARGO_PKG_VERSION")));
    let out = tessera(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("spec"));
    let out = tessera(&["no-such-command"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn every_example_spec_is_valid() {
    let dir = workspace_root().join("deploy/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = tessera(&["spec", "check", "-o", "json", path.to_str().unwrap()]);
            assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
            let spec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert!(spec["shards"].as_u64().unwrap() >= 1);
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected the example specs in {}", dir.display());
}

#[test]
fn an_invalid_spec_names_field_and_line_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "command = [\"python3\", \"t.py\"]\nshards = 2\n\n[placement]\nspot = \"sometimes\"\n")
        .unwrap();
    let out = tessera(&["spec", "check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 5") && err.contains("placement.spot"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let out = tessera(&["spec", "check", dir.path().join("missing.toml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn the_readme_spec_example_is_valid_and_means_what_it_says() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let start = readme.find("```toml\n").expect("a toml block in README.md") + "```toml\n".len();
    let len = readme[start..].find("```").unwrap();
    let spec = tessera_core::spec::parse_toml(&readme[start..start + len]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spec.shards, 4);
    assert_eq!(spec.priority, 750);
    assert_eq!(spec.max_runtime_secs, Some(12 * 3600));
    assert_eq!(spec.resources.cpu_millis, 96_000);
    assert_eq!(spec.placement.labels.get("fabric").map(String::as_str), Some("efa"));
    assert_eq!(spec.retry.never_retry_exit_codes, vec![2]);
}
