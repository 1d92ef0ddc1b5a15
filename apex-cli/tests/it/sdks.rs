//! `apex simulate` as the official Python SDKs see it: chat, Responses,
//! Messages and streaming, every answer parsed with the SDKs' own types
//! (`tests/sdk/check_sdks.py`). The SDKs are installed, latest, into a
//! throwaway venv; where no package index is reachable the test says so and
//! skips, unless `APEX_REQUIRE_SDKS=1` (set by `scripts/test.sh`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "sk-sdk-check-0123456789";

/// A venv with the latest `openai` and `anthropic`, or why there is none.
fn venv() -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-venv");
    let python = dir.join("bin/python");
    if !python.exists() {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("python3 -m venv: {e}"))?;
        if !made.status.success() {
            return Err(format!(
                "python3 -m venv failed: {}",
                String::from_utf8_lossy(&made.stderr)
            ));
        }
    }
    let pip = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--upgrade",
            "--timeout",
            "30",
            "openai",
            "anthropic",
        ])
        .output()
        .map_err(|e| format!("pip: {e}"))?;
    if !pip.status.success() {
        return Err(format!(
            "pip install openai anthropic failed (no package index?): {}",
            String::from_utf8_lossy(&pip.stderr).trim()
        ));
    }
    Ok(python)
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn official_sdks_parse_every_answer_of_apex_simulate() {
    let python = match venv() {
        Ok(python) => python,
        Err(reason) if std::env::var("APEX_REQUIRE_SDKS").as_deref() != Ok("1") => {
            eprintln!("skipped: {reason}");
            return;
        }
        Err(reason) => panic!("{reason}"),
    };
    let versions = Command::new(&python)
        .args([
            "-c",
            "import openai, anthropic; print('openai', openai.__version__, 'anthropic', anthropic.__version__)",
        ])
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&versions.stdout).trim());
    let dir = tempfile::tempdir().unwrap();
    let addr_file = dir.path().join("addr");
    let _sim = Child(
        Command::new(env!("CARGO_BIN_EXE_apex"))
            .args([
                "simulate",
                "--api-key",
                KEY,
                "--time-scale",
                "0.01",
                "--batch-time",
                "30",
                "--addr-file",
            ])
            .arg(&addr_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    let addr = loop {
        if let Ok(addr) = std::fs::read_to_string(&addr_file)
            && !addr.trim().is_empty()
        {
            break addr.trim().to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "apex simulate did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/check_sdks.py");
    let out = Command::new(&python)
        .arg(&script)
        .args([&addr, KEY])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all SDK checks passed"), "{stdout}");
}
