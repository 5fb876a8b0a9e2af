"""``ambit ca --dir`` keeps the CA's key private: a directory it makes is 0700, an existing one that other users
may enter is refused (not tightened: it is the user's), key files are 0600 even over an existing file."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.ca import __main__ as ca_main
from agent.ca.files import KeyDirectoryError, private_directory, write_private


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_makes_the_directory_0700(tmp_path: Path) -> None:
    ca_dir = tmp_path / "deep" / "ca"
    ca_main.main(["--dir", str(ca_dir), "--init"])
    assert mode(ca_dir) == 0o700
    assert mode(ca_dir / "root-key.pem") == 0o600 and mode(ca_dir / "root-cert.pem") == 0o644


def test_init_refuses_an_existing_directory_others_may_enter(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(SystemExit) as e:
        ca_main.main(["--dir", str(shared), "--init"])
    assert str(e.value) == (f"ambit-ca: refusing to write a private key into {shared}: other users may enter it "
                            f"(mode 0755); `chmod 700 {shared}`, or name a directory that does not exist yet")
    assert list(shared.iterdir()) == [] and mode(shared) == 0o755  # nothing written, its mode left alone
    shared.chmod(0o700)
    ca_main.main(["--dir", str(shared), "--init"])
    assert (shared / "root-key.pem").exists()


def test_the_rules_themselves(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(KeyDirectoryError, match="exists and is not a directory"):
        private_directory(tmp_path / "file")
    group = tmp_path / "group"
    group.mkdir()
    group.chmod(0o750)
    with pytest.raises(KeyDirectoryError, match=r"mode 0750"):
        private_directory(group)
    key = tmp_path / "key.pem"
    key.write_bytes(b"old")
    key.chmod(0o644)
    write_private(key, b"new")
    assert key.read_bytes() == b"new" and mode(key) == 0o600


def test_issue_needs_a_ca_and_its_flags(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        ca_main.main(["--dir", str(tmp_path / "none"), "--issue", "operator", "--out", str(tmp_path / "op")])
    assert str(e.value) == f"ambit-ca: no CA in {tmp_path / 'none'}: make one with --init, or name the CA's " \
                           "directory with --dir"
    for bad in (["--issue", "operator"], ["--init", "--issue", "operator", "--out", "x"], ["--out", "x"],
                ["--issue", "operator", "--out", "x", "--days", "0"], ["--issue", "nobody", "--out", "x"]):
        with pytest.raises(SystemExit):
            ca_main.parse_args(["--dir", str(tmp_path), *bad])
