use std::fs;
use std::path::Path;

use apex_store::files::{read_conditions_file, read_package_dir, read_packages_under};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    let path = dir.join(name);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

#[test]
fn reads_packages_in_order_with_context_folders() {
    let root = tempfile::tempdir().unwrap();
    write(root.path(), "b/context.md", b"second");
    write(root.path(), "b/prompt.md", b"go");
    write(root.path(), "a/context/02.md", b"two");
    write(root.path(), "a/context/01.md", b"one");
    write(root.path(), "a/context/.hidden", b"ignored");
    write(root.path(), "a/prompt.md", b"go");
    write(root.path(), "a/system.md", b"sys");
    write(root.path(), "README.md", b"not a package");
    let packages = read_packages_under(root.path()).unwrap();
    let ids: Vec<_> = packages.iter().map(|p| p.id()).collect();
    assert_eq!(ids, vec!["a", "b"]);
    assert_eq!(&**packages[0].context(), "one\n\ntwo");
    assert_eq!(packages[0].system().map(|s| &**s), Some("sys"));
    assert!(packages[1].system().is_none());
}

#[test]
fn package_errors_name_the_file_and_fix() {
    type Files<'a> = &'a [(&'a str, &'a [u8])];
    let cases: &[(Files, &str)] = &[
        (&[("context.md", b"x")], "no `prompt.md`"),
        (
            &[("context.md", b""), ("prompt.md", b"go")],
            "`context.md` is empty",
        ),
        (
            &[("context.md", b"ok\xc3\x28"), ("prompt.md", b"go")],
            "`context.md` is not UTF-8",
        ),
        (&[("prompt.md", b"go")], "no context"),
        (
            &[
                ("context.md", b"x"),
                ("context/a.md", b"y"),
                ("prompt.md", b"go"),
            ],
            "both `context.md` and `context/`",
        ),
        (
            &[
                ("context.md", b"x"),
                ("prompt.md", b"go"),
                ("notes.txt", b"n"),
            ],
            "unexpected entry `notes.txt`",
        ),
    ];
    for (files, needle) in cases {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ctx-01");
        fs::create_dir(&dir).unwrap();
        for (name, bytes) in *files {
            write(&dir, name, bytes);
        }
        let err = read_package_dir(&dir).unwrap_err().to_string();
        assert!(err.starts_with("context package `ctx-01`"), "{err}");
        assert!(err.contains(needle), "{needle}: {err}");
        assert!(!err.contains('\n'));
    }
}

#[test]
fn one_bad_package_fails_the_whole_directory() {
    let root = tempfile::tempdir().unwrap();
    write(root.path(), "a/context.md", b"x");
    write(root.path(), "a/prompt.md", b"go");
    write(root.path(), "b/context.md", b"x");
    let err = read_packages_under(root.path()).unwrap_err().to_string();
    assert!(err.contains("`b`"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    assert!(
        read_packages_under(empty.path())
            .unwrap_err()
            .to_string()
            .contains("no package directories")
    );
}

#[test]
fn conditions_file_errors_name_the_file() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("c.toml");
    fs::write(&path, "[[condition]]\nslug = 'x'\n").unwrap();
    let err = read_conditions_file(&path).unwrap_err().to_string();
    assert!(err.contains("c.toml"), "{err}");
    assert!(err.contains("missing field"), "{err}");
    let err = read_conditions_file(&root.path().join("missing.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot read"), "{err}");
}
