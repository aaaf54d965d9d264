//! The binary's surface: help texts and configuration errors.

use std::process::Command;

fn candlestream(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_candlestream"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn producer_help_documents_the_subcommand() {
    let (ok, text) = candlestream(&["producer", "--help"], &[]);
    assert!(ok, "{text}");
    for needle in ["Bitfinex", "Avro", "--config", "SIGTERM", "CANDLESTREAM__"] {
        assert!(
            text.contains(needle),
            "producer --help lacks {needle:?}:\n{text}"
        );
    }
    let (ok, text) = candlestream(&["--help"], &[]);
    assert!(ok && text.contains("producer"), "{text}");
}

#[test]
fn configuration_mistakes_fail_fast_with_the_key_named() {
    let (ok, text) = candlestream(&["producer"], &[("CANDLESTREAM__KAFKA__BROKRES", "x:1")]);
    assert!(!ok);
    assert!(text.contains("brokres"), "{text}");
    let (ok, text) = candlestream(&["producer", "--config", "no/such/file.toml"], &[]);
    assert!(!ok);
    assert!(text.contains("file.toml"), "{text}");
}
