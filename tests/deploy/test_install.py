"""deploy/install-service, run as root into a temporary root (``--root``).

The script creates users and groups with shadow's ``useradd/groupadd --root``,
so each test builds a small system root (etc/passwd, group, shadow, gshadow)
and reads owners back by the numeric ids written there: the host's own users
are never touched. The unit it installs is checked with
``systemd-analyze verify --root``, which also proves ExecStart= names an
executable inside that root.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "install-service"

pytestmark = pytest.mark.timeout(300)


def make_root(tmp: Path, *, freeswitch: bool = True) -> Path:
    """A system root with just the user database, as useradd --root needs it."""
    root = tmp / "root"
    (root / "etc").mkdir(parents=True)
    groups = "root:x:0:\n" + ("freeswitch:x:995:\n" if freeswitch else "")
    gshadow = "root:*::\n" + ("freeswitch:!::\n" if freeswitch else "")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "group").write_text(groups)
    (root / "etc" / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc" / "gshadow").write_text(gshadow)
    for name in ("shadow", "gshadow"):
        (root / "etc" / name).chmod(0o640)
    return root


def install(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        ["bash", str(SCRIPT), "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=240,
    )
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def _entries(path: Path) -> dict[str, list[str]]:
    return {line.split(":")[0]: line.split(":") for line in path.read_text().splitlines()}


def passwd(root: Path) -> dict[str, list[str]]:
    return _entries(root / "etc/passwd")


def groups(root: Path) -> dict[str, list[str]]:
    return _entries(root / "etc/group")


def owner_mode(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file's owner, mode and content (or link target) under root."""
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if rel.endswith("-") or rel == "etc/.pwd.lock":  # shadow's backups and lock file
            continue
        if p.is_symlink():
            body: object = os.readlink(p)
        elif p.is_file():
            body = p.read_bytes()
        else:
            body = None
        out[rel] = (*owner_mode(p), body)
    return out


def unit_lines(root: Path) -> list[str]:
    return (root / "etc/systemd/system/fsrecrypt.service").read_text().splitlines()


def test_fresh_install_creates_user_groups_directories_and_files_with_owners_and_modes(
    tmp_path: Path,
) -> None:
    root = make_root(tmp_path)
    host = {name: Path("/etc", name).read_bytes() for name in ("passwd", "group", "shadow")}
    res = install(root, "--no-venv")
    assert "created user fsrecrypt" in res.stdout

    user = passwd(root)["fsrecrypt"]
    grp = groups(root)
    uid, gid = int(user[2]), int(grp["fsrecrypt"][2])
    fs_gid = int(grp["freeswitch"][2])
    assert int(user[3]) == gid, "primary group is fsrecrypt"
    assert uid < 1000 and user[5] == "/var/lib/fsrecrypt" and user[6] == "/usr/sbin/nologin"
    # Member of FreeSWITCH's group (recordings) and listed in its own group
    # (the unit runs with Group=freeswitch, so /etc/fsrecrypt's group comes from here).
    assert "fsrecrypt" in grp["freeswitch"][3].split(",")
    assert "fsrecrypt" in grp["fsrecrypt"][3].split(",")
    # The host's own user database is not touched.
    assert {name: Path("/etc", name).read_bytes() for name in host} == host

    assert owner_mode(root / "etc/fsrecrypt") == (0, gid, 0o750)
    assert owner_mode(root / "etc/fsrecrypt/fsrecrypt.toml") == (0, gid, 0o640)
    assert (root / "etc/fsrecrypt/fsrecrypt.toml").read_bytes() == (
        ROOT / "conf/fsrecrypt.toml"
    ).read_bytes()
    assert owner_mode(root / "etc/fsrecrypt/credentials") == (0, 0, 0o700)
    for name in ("esl-password", "db-password", "README"):
        assert owner_mode(root / "etc/fsrecrypt/credentials" / name) == (0, 0, 0o600), name
    # The ESL password file is read whole: it must not hold a comment as "password".
    assert (root / "etc/fsrecrypt/credentials/esl-password").read_text() == ""
    # db-password is a pgpass file (PGPASSFILE): comments only = no password.
    pgpass = (root / "etc/fsrecrypt/credentials/db-password").read_text().splitlines()
    assert pgpass and all(line.startswith("#") for line in pgpass)
    # The state directory matches what StateDirectory=/Group= will enforce.
    assert owner_mode(root / "var/lib/fsrecrypt") == (uid, fs_gid, 0o700)

    link = root / "usr/local/bin/fsrecrypt"
    assert link.is_symlink() and os.readlink(link) == "/opt/fsrecrypt/bin/fsrecrypt"
    doc = root / "usr/local/share/doc/fsrecrypt/README.rst"
    assert doc.read_bytes() == (ROOT / "README.rst").read_bytes()

    lines = unit_lines(root)
    assert "ExecStart=/opt/fsrecrypt/bin/fsrecrypt -c /etc/fsrecrypt/fsrecrypt.toml run" in lines
    assert "User=fsrecrypt" in lines and "Group=freeswitch" in lines
    assert "Documentation=file:///usr/local/share/doc/fsrecrypt/README.rst" in lines
    assert owner_mode(root / "etc/systemd/system/fsrecrypt.service") == (0, 0, 0o644)


def test_prefix_is_written_into_execstart_and_the_symlink(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    install(root, "--no-venv", "--prefix", "/srv/fsr")
    execstart = "ExecStart=/srv/fsr/bin/fsrecrypt -c /etc/fsrecrypt/fsrecrypt.toml run"
    assert execstart in unit_lines(root)
    assert os.readlink(root / "usr/local/bin/fsrecrypt") == "/srv/fsr/bin/fsrecrypt"


@pytest.mark.parametrize(
    "prefix",
    ["relative/dir", "/opt/fs recrypt", "/opt/x#y", "/opt/x\nExecStartPre=/bin/sh", "/opt/é"],
)
def test_a_prefix_that_would_corrupt_the_unit_is_refused_before_anything_is_created(
    tmp_path: Path, prefix: str
) -> None:
    root = make_root(tmp_path)
    before = snapshot(root)
    res = install(root, "--no-venv", "--prefix", prefix, check=False)
    assert res.returncode != 0
    assert "--prefix" in res.stderr
    assert snapshot(root) == before


def test_second_run_changes_nothing_and_keeps_config_and_credentials(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    install(root, "--no-venv")
    conf = root / "etc/fsrecrypt/fsrecrypt.toml"
    conf.write_text('[database]\ndsn = "postgresql://fsrecrypt@db/fsrecrypt"\n')
    (root / "etc/fsrecrypt/credentials/esl-password").write_text("s3cret\n")
    (root / "etc/fsrecrypt/credentials/db-password").write_text("db:5432:fsrecrypt:fsrecrypt:pw\n")
    before = snapshot(root)

    res = install(root, "--no-venv")
    assert "kept /etc/fsrecrypt/fsrecrypt.toml" in res.stdout
    assert "created" not in res.stdout
    assert snapshot(root) == before
    assert list(passwd(root)) == ["root", "fsrecrypt"]


def test_rerun_repairs_a_config_the_service_user_cannot_read(tmp_path: Path) -> None:
    """The old README installed the config root:root 0640: the daemon could not read it."""
    root = make_root(tmp_path)
    install(root, "--no-venv")
    conf = root / "etc/fsrecrypt/fsrecrypt.toml"
    conf.write_text("# mine\n")
    os.chown(conf, 0, 0)
    conf.chmod(0o600)
    install(root, "--no-venv")
    gid = int(groups(root)["fsrecrypt"][2])
    assert owner_mode(conf) == (0, gid, 0o640)
    assert conf.read_text() == "# mine\n"


def test_without_freeswitch_group_the_service_uses_its_own_group_until_a_rerun(
    tmp_path: Path,
) -> None:
    root = make_root(tmp_path, freeswitch=False)
    res = install(root, "--no-venv")
    assert "group 'freeswitch' does not exist" in res.stdout
    assert "Group=fsrecrypt" in unit_lines(root)
    gid = int(groups(root)["fsrecrypt"][2])
    assert owner_mode(root / "var/lib/fsrecrypt")[1:] == (gid, 0o700)

    # FreeSWITCH installed later (its package creates the group): run it again.
    with (root / "etc/group").open("a") as f:
        f.write("freeswitch:x:995:\n")
    with (root / "etc/gshadow").open("a") as f:
        f.write("freeswitch:!::\n")
    res = install(root, "--no-venv")
    assert "added user fsrecrypt to group freeswitch" in res.stdout
    assert groups(root)["freeswitch"][3] == "fsrecrypt"
    assert "Group=freeswitch" in unit_lines(root)
    assert owner_mode(root / "var/lib/fsrecrypt")[1:] == (995, 0o700)


def test_an_unusable_root_is_refused_with_a_clear_message_and_nothing_created(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    res = install(empty, "--no-venv", check=False)
    assert res.returncode != 0
    assert "etc/passwd does not exist" in res.stderr
    assert list(empty.iterdir()) == []


def test_an_existing_non_symlink_command_is_not_replaced(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    own = root / "usr/local/bin/fsrecrypt"
    own.parent.mkdir(parents=True)
    own.write_text("#!/bin/sh\necho operator's own\n")
    res = install(root, "--no-venv", check=False)
    assert res.returncode != 0 and "not a symlink" in res.stderr
    assert own.read_text() == "#!/bin/sh\necho operator's own\n"


def _systemd_root(root: Path) -> None:
    """Give the temporary root what any Debian system has for the unit to load:
    systemd's own units (sysinit.target ...) and /bin/kill for ExecReload=."""
    (root / "usr/lib/systemd").mkdir(parents=True, exist_ok=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2("/usr/bin/kill", root / "usr/bin/kill")
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("usr/lib")


def _verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "fsrecrypt.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_installed_unit_passes_systemd_analyze_verify_and_its_execstart_runs() -> None:
    subprocess.run(["bash", str(ROOT / ".ci" / "ensure-systemd-analyze")], check=True)
    # Not under pytest's tmp_path (0700 root): the service user must reach the files.
    tmp = Path(tempfile.mkdtemp(prefix="fsrecrypt-install-"))
    try:
        _install_verify_and_run(tmp)
    finally:
        shutil.rmtree(tmp)


def _install_verify_and_run(tmp: Path) -> None:
    tmp.chmod(0o755)
    root = make_root(tmp)
    _systemd_root(root)

    # Without the virtualenv the unit's ExecStart= names nothing: verify says so.
    install(root, "--no-venv")
    res = _verify(root)
    assert res.returncode != 0
    assert "/opt/fsrecrypt/bin/fsrecrypt is not executable" in res.stderr

    install(root, "--python", sys.executable)
    res = _verify(root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr.strip() == "", res.stderr

    execstart = next(line for line in unit_lines(root) if line.startswith("ExecStart="))
    command = execstart.removeprefix("ExecStart=").split()[0]
    run = subprocess.run(
        [str(root) + command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and "Usage: fsrecrypt" in run.stdout, run.stderr

    # The service user, with the groups the unit gives it (Group=freeswitch plus
    # its member groups), reads the installed config: `config check` passes.
    uid = int(passwd(root)["fsrecrypt"][2])
    grp = groups(root)
    fs_gid, own_gid = int(grp["freeswitch"][2]), int(grp["fsrecrypt"][2])
    check = subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={fs_gid}",
            f"--groups={own_gid},{fs_gid}",
            str(root) + command,
            "-c",
            f"{root}/etc/fsrecrypt/fsrecrypt.toml",
            "config",
            "check",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # Without the membership in its own group the config would be unreadable.
    denied = subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={fs_gid}",
            f"--groups={fs_gid}",
            str(root) + command,
            "-c",
            f"{root}/etc/fsrecrypt/fsrecrypt.toml",
            "config",
            "check",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert denied.returncode != 0
    assert "Permission denied" in denied.stderr and "fsrecrypt.toml" in denied.stderr

    # Running it again upgrades in place and leaves a unit that still verifies.
    install(root, "--python", sys.executable)
    assert _verify(root).returncode == 0

    sec = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            f"--root={root}",
            "--no-pager",
            "fsrecrypt.service",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for fsrecrypt\.service: ([0-9.]+) (\w+)", sec.stdout)
    assert m, sec.stdout[-2000:] + sec.stderr
    assert m.group(2) in ("PERFECT", "SAFE", "OK"), m.group(0)
