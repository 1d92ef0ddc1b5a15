//! Compiles the PostgreSQL half of the conformance suite as ignored (with
//! the reason shown by `cargo test`) unless `APEX_TEST_PG=1` says a server
//! is available at `APEX_TEST_PG_URL`. A flag, not the URL, decides: the
//! throwaway server's URL changes every time, and should not rebuild crates.
fn main() {
    println!("cargo::rerun-if-env-changed=APEX_TEST_PG");
    println!("cargo::rustc-check-cfg=cfg(pg_tests)");
    if std::env::var("APEX_TEST_PG").is_ok_and(|v| v == "1") {
        println!("cargo::rustc-cfg=pg_tests");
    }
}
